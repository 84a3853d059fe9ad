"""The `pgjob` command: parse, call the library, print. No logic lives here."""
from __future__ import annotations

import json
import logging
import sys

import click

from . import __version__, endpoint, health
from .errors import PgJobError
from .home import Home
from .privilege import enter, enter_as

HOME_HELP = "Instance home (default: $PGJOB_HOME, else ~/.pgjob/default)."


class Group(click.Group):
    """Expected failures become one clear message and a documented exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except PgJobError as exc:
            click.echo(f"pgjob: error: {exc}", err=True)
            sys.exit(exc.exit_code)


def open_home(home, run_as: str = "", *, create: bool = False) -> Home:
    """The door every command goes through: started as root, pgjob becomes the home's
    account here, before anything touches the home (privilege.py)."""
    return Home(enter(home, run_as, create=create))


def home_option(f):
    return click.option("--home", envvar="PGJOB_HOME", type=click.Path(), help=HOME_HELP)(f)


@click.group(cls=Group)
@click.version_option(__version__, prog_name="pgjob")
def main() -> None:
    """Run a PostgreSQL server inside a batch job, for Optuna studies and the like."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s pgjob: %(message)s", datefmt="%H:%M:%S")


@main.command()
@home_option
@click.option("--workers", type=int, help="Worker processes to plan connections for (default 64).")
@click.option("--port", type=int, help="Preferred TCP port (default 5432; a free one is used if taken).")
@click.option("--database", help="Study database name (default optuna).")
@click.option("--user", help="Application role name (default optuna).")
@click.option("--allow", multiple=True, metavar="CIDR",
              help="Network allowed to connect; repeatable (default: the serving node's networks).")
@click.option("--pg-bin", envvar="PGJOB_PG_BIN", type=click.Path(),
              help="Folder holding initdb and postgres.")
@click.option("--run-as", help="As root: the account a new home belongs to and PostgreSQL "
              "runs as (default postgres); an existing home runs as its owner.")
@click.option("--storage", type=click.Choice(["rdb", "journal"]),
              help="How studies are kept: rdb (default; `pgjob url` works for any Optuna "
                   "client) or journal (several times faster; through pgjob.optuna_storage()).")
def init(home, **options) -> None:
    """Create an instance home, or check and repair an existing one (data is kept)."""
    from .initialize import init as do_init

    result = do_init(open_home(home, options["run_as"] or "", create=True).path, **options)
    verb = "created" if result.created else "checked and repaired"
    click.echo(f"pgjob home {verb}: {result.home.path}")
    reach = ("pgjob.optuna_storage() in workers (a journal home has no URL)"
             if result.settings.storage == "journal" else "`pgjob url --wait 60` in workers")
    click.echo(f"next: `pgjob serve --home {result.home.path}` (or sbatch "
               f"jobscripts/pgjob-serve.sh), then {reach}")


@main.command()
@home_option
@click.option("--host", default="", help="Address to publish and listen on (default: this node's cluster address).")
@click.option("--interface", default="", help="Network interface whose address to use, e.g. ib0.")
@click.option("--run-as", default="", help="As root: the home's owner, which pgjob and "
              "PostgreSQL then run as (the default).")
@click.option("--health-interval", default=5.0, show_default=True, help="Seconds between health checks.")
@click.option("--renew/--no-renew", default=False, show_default=True,
              help="Under Slurm, PBS or LSF: queue the next serve job, which takes over when this one ends.")
def serve(home, **options) -> None:
    """Run the server in the foreground until stopped (the body of a batch job)."""
    from .serve import serve as do_serve

    path = open_home(home, options.pop("run_as")).path
    sys.exit(do_serve(path, **options))


@main.command()
@home_option
@click.option("--wait", default=0.0, metavar="SECONDS",
              help="Wait this long for the server to be published and answer.")
@click.option("--format", "fmt", default="sqlalchemy", show_default=True,
              type=click.Choice(["sqlalchemy", "libpq", "json", "env", "hydra"]))
def url(home, wait, fmt) -> None:
    """Print how to connect to the published server (no password: it stays in a passfile)."""
    from .api import connection_text

    click.echo(connection_text(open_home(home).require(), wait, fmt))


@main.command()
@home_option
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status(home, as_json) -> None:
    """Health check: exit 0 healthy, 1 degraded, 2 down or not published."""
    result = health.check(open_home(home).require())
    click.echo(json.dumps(result.as_dict(), indent=2) if as_json else health.render(result))
    sys.exit(result.level)


@main.command()
@home_option
@click.option("--wait", default=0.0, metavar="SECONDS", help="Wait this long for the server to stop.")
def stop(home, wait) -> None:
    """Ask the serving process to stop cleanly (works from any node that sees the home)."""
    from .control import request_stop

    report = request_stop(open_home(home).path, wait)
    if wait and not report.stopped:
        raise PgJobError(report.message)
    click.echo(f"pgjob: {report.message}")


@main.command("break-lease")
@home_option
def break_lease(home) -> None:
    """Release the lease of a server that is gone, when pgjob cannot prove it (a job killed
    on another node, a clock far ahead): a new serve may then start at once."""
    from .control import break_lease as do_break

    click.echo(f"pgjob: {do_break(open_home(home).path)}")


@main.command()
@home_option
@click.option("--out", type=click.Path(file_okay=False), help="Folder for the dump (default: HOME/backups, rotated).")
def backup(home, out) -> None:
    """Dump the study database now (pg_dump, custom format); print the file's path."""
    from pathlib import Path

    from . import backup as backups
    from . import binaries

    target = open_home(home).require()
    found = endpoint.wait_connectable(target, timeout=0)
    made = backups.dump(target, binaries.find(target.settings().pg_bin), host=found.host,
                        port=found.port, out_dir=Path(out).absolute() if out else None)
    click.echo(f"backup written: {made}")


@main.command("rotate-password")
@home_option
def rotate_password(home) -> None:
    """Give the application role a new password, without stopping the study."""
    from .passwords import rotate

    rotate(open_home(home).require())
    click.echo("pgjob: the application password was changed; workers use the new one "
               "when they next connect")


@main.command()
@click.argument("dump_file", type=click.Path(dir_okay=False))
@home_option
@click.option("--workers", type=int, help="As for `pgjob init`.")
@click.option("--port", type=int, help="As for `pgjob init`.")
@click.option("--allow", multiple=True, metavar="CIDR", help="As for `pgjob init`.")
@click.option("--pg-bin", envvar="PGJOB_PG_BIN", type=click.Path(), help="As for `pgjob init`.")
@click.option("--run-as", help="As for `pgjob init`.")
def restore(dump_file, home, **options) -> None:
    """Make a new home (as `pgjob init` does) holding the studies of a backup."""
    from .initialize import restore_new_home

    target = open_home(home, options["run_as"] or "", create=True).path
    made = restore_new_home(dump_file, target, **options)
    click.echo(f"restored {dump_file} into the new home {made.path} (storage = "
               f"{made.settings().storage!r}); serve it with "
               f"`pgjob serve --home {made.path}` or `pgjob submit --home {made.path}`")


@main.command(context_settings={"ignore_unknown_options": True,
                                "allow_interspersed_args": False})
@home_option
@click.option("--scheduler", type=click.Choice(["slurm", "pbs", "lsf"]),
              help="Submit with sbatch, qsub or bsub (default: the first of them on PATH).")
@click.argument("submit_options", nargs=-1, type=click.UNPROCESSED)
def submit(home, scheduler, submit_options) -> None:
    """Submit the serve job script for this home (sbatch, qsub or bsub); print the job id.

    Options after the home go to the submit command as they are, e.g.
    `pgjob submit --time=8:00:00` (Slurm) or `pgjob submit -l walltime=8:00:00` (PBS).
    """
    from .submission import submit as do_submit

    click.echo(do_submit(open_home(home).require(), tuple(submit_options),
                         scheduler=scheduler or ""))


@main.command()
@click.option("--workers", default=3, show_default=True, help="Local worker processes.")
@click.option("--trials", default=30, show_default=True, help="Trials in the demo study.")
@click.option("--keep", is_flag=True, help="Keep the temporary home afterwards.")
def demo(workers, trials, keep) -> None:
    """Show the whole flow on this machine: init, serve, workers, status, stop."""
    from .demo import run_demo

    account = enter_as()
    sys.exit(run_demo(workers=workers, trials=trials, keep=keep, say=click.echo,
                      started_as_root_for=account.name if account else ""))


@main.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell) -> None:
    """Print the shell completion script, e.g. eval "$(pgjob completion bash)" in ~/.bashrc."""
    from click.shell_completion import get_completion_class

    script = get_completion_class(shell)(main, {}, "pgjob", "_PGJOB_COMPLETE").source()
    click.echo(script.rstrip("\n"))


def ssh_options(f):
    f = click.option("--ssh-option", "-o", "ssh_options", multiple=True, metavar="OPTION",
                     help="Passed to ssh as -o OPTION, e.g. -o User=me; repeatable.")(f)
    return click.option("--wait", default=0.0, metavar="SECONDS",
                        help="Wait this long for the server to be published.")(f)


def say(message: str) -> None:
    click.echo(message, err=True)


@main.command()
@home_option
@click.option("--via", required=True, metavar="GATEWAY",
              help="ssh destination that reaches the compute nodes, e.g. me@login1; "
                   "a,b goes through a to b (ssh -J).")
@click.option("--local-port", default=0, type=int, help="Local port (default: a free one).")
@click.option("--format", "fmt", type=click.Choice(["sqlalchemy", "libpq"]),
              help="URL form (default sqlalchemy; libpq on a journal home, which has no "
                   "Optuna URL).")
@ssh_options
def tunnel(home, via, local_port, fmt, ssh_options, wait) -> None:
    """Forward a local port to the serving node over ssh; print a local URL; follow moves."""
    from . import tunnel as tunnels
    from .storage import check_url_works

    target = open_home(home).require()
    if fmt is None:
        fmt = "libpq" if target.settings().storage == "journal" else "sqlalchemy"
    if fmt == "sqlalchemy":
        check_url_works(target)
    opened = tunnels.Tunnel(target, via, local_port=local_port,
                            ssh_options=ssh_options, say=say)
    local = opened.open(wait)
    click.echo(local.sqlalchemy_url(tunnels.TUNNEL_SSLMODE) if fmt == "sqlalchemy"
               else local.libpq_url(tunnels.TUNNEL_SSLMODE))
    say(f"pgjob tunnel: {local.host}:{local.port} -> {opened.route.spec} via {via}; it "
        "follows the server if it moves; Ctrl-C to close")
    tunnels.run_until_stopped(opened)


@main.command(context_settings={"ignore_unknown_options": True,
                                "allow_interspersed_args": False})
@home_option
@click.option("--wait", default=0.0, metavar="SECONDS",
              help="Wait this long for the server to be published and answer.")
@click.argument("psql_args", nargs=-1, type=click.UNPROCESSED)
def psql(home, wait, psql_args) -> None:
    """psql on the study database, no password typed; arguments after -- go to psql."""
    from .psql import exec_psql

    target = open_home(home).require()
    exec_psql(endpoint.wait_connectable(target, timeout=wait), tuple(psql_args),
              pg_bin=target.settings().pg_bin)


@main.command()
@home_option
@click.option("--port", default=8080, show_default=True, help="Local port of the dashboard.")
@click.option("--via", metavar="GATEWAY", help="Reach the server through an ssh tunnel "
              "(as for `pgjob tunnel`).")
@ssh_options
def dashboard(home, port, via, ssh_options, wait) -> None:
    """optuna-dashboard on this instance's studies (needs pgjob[dashboard])."""
    from . import dashboard as dashboards

    target = open_home(home).require()
    if via:
        from .tunnel import Tunnel

        dashboards.serve_through(Tunnel(target, via, ssh_options=ssh_options, say=say),
                                 port=port, wait=wait, say=say)
    else:
        dashboards.serve_local(target, port=port, wait=wait, say=say)


def transfer_options(f):
    for option in reversed((
            click.option("--study", "studies", multiple=True, metavar="NAME",
                         help="Copy this study; repeatable (default: every study)."),
            click.option("--format", "fmt", type=click.Choice(["sqlite", "journal"]),
                         help="The file's kind, for a new file whose name does not say "
                              "(.db, .sqlite, .sqlite3: sqlite; .log, .jsonl, .journal: "
                              "journal); an existing file is known by its content."),
            click.option("--allow-running", is_flag=True,
                         help="Copy studies that have RUNNING trials (they stay RUNNING "
                              "in the copy, where nothing runs them)."),
            click.option("--wait", default=0.0, metavar="SECONDS",
                         help="Wait this long for the home's server (and the other "
                              "home's) to answer."))):
        f = option(f)
    return home_option(f)


def _one_of(file, other, file_name: str, home_option_name: str) -> None:
    if bool(file) == bool(other):
        from .errors import UsageError

        raise UsageError(f"name one {file_name} file or one {home_option_name} HOME "
                         f"({'both were' if file else 'neither was'} given)")


@main.command()
@transfer_options
@click.option("--to-home", type=click.Path(), help="Copy into this other pgjob home "
              "instead of a file (its storage, rdb or journal, is whatever it is set to).")
@click.argument("target", required=False)
def export(home, studies, fmt, allow_running, wait, to_home, target) -> None:
    """Copy studies into a SQLite file, an Optuna journal file, or another home.

    TARGET is a file (results.db, sqlite:///results.db, results.log). A new file is made
    0600; an existing one must already be an Optuna storage. A study whose name the target
    already has is refused, never merged."""
    from . import transfer

    _one_of(target, to_home, "TARGET", "--to-home")
    mine = open_home(home).require()
    to_file = transfer.study_file(target, fmt or "") if target else None
    other = transfer.other_home(to_home, mine) if to_home else None
    transfer.export(mine, to_file=to_file, to_home=other, studies=studies,
                    allow_running=allow_running, wait=wait, say=click.echo)


@main.command("import")
@transfer_options
@click.option("--from-home", type=click.Path(), help="Copy from this other pgjob home "
              "instead of a file.")
@click.argument("source", required=False)
def import_(home, studies, fmt, allow_running, wait, from_home, source) -> None:
    """Copy studies from a SQLite file, an Optuna journal file, or another home.

    SOURCE is a file (results.db, sqlite:///results.db, results.log). A study whose name
    the home already has is refused, never merged."""
    from . import transfer

    _one_of(source, from_home, "SOURCE", "--from-home")
    mine = open_home(home).require()
    from_file = transfer.study_file(source, fmt or "", new=False) if source else None
    other = transfer.other_home(from_home, mine) if from_home else None
    transfer.import_(mine, from_file=from_file, from_home=other, studies=studies,
                     allow_running=allow_running, wait=wait, say=click.echo)
