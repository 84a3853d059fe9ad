"""What the unit tests share."""
import pytest

from pgjob.home import Home


@pytest.fixture
def home(tmp_path) -> Home:
    """A home's folders as `pgjob init` makes them, private and empty. (Test files that
    need a home set up otherwise define their own `home`.)"""
    found = Home(tmp_path / "home")
    for folder in (found.path, found.secrets, found.run):
        folder.mkdir(mode=0o700)
    return found
