"""Home.check_trusted while serve writes in run/: a file gone since it was listed."""
from pgjob.home import Home


def test_a_file_that_vanishes_while_the_home_is_checked_is_no_error(home, monkeypatch):
    listed = home.guarded_paths()
    # serve's lease writer renames its temporary file between the listing and the check
    monkeypatch.setattr(Home, "guarded_paths",
                        lambda self: [*listed, home.run / ".lease-gone"])
    home.check_trusted()
