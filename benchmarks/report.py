"""Turn one run's results into docs/performance.md (tables), performance.json and PNG plots."""
from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
FINDINGS = HERE / "findings.md"


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _pct(p: dict) -> str:
    return f"{p['p50']:.1f} / {p['p95']:.1f} / {p['p99']:.1f}"


def _cpu(row: dict) -> str:
    worker, server = row.get("worker_cpu_ms", 0), row.get("server_cpu_ms", 0)
    return f"{worker:.1f} + {server:.1f}" if server else f"{worker:.1f}"


def _yes(flag: bool) -> str:
    return "met" if flag else "**not met**"


def machine_table(machine: dict) -> str:
    return _table(["", ""], [[k, v] for k, v in machine.items()])


def targets_table(results: dict) -> str:
    rows = []
    for section in ("cold_start", "throughput", "journal_size", "journal_join", "connections"):
        for name, met in results[section]["targets"].items():
            rows.append([section.replace("_", " "), name, _yes(met)])
    for mode, r in results["scale"]["modes"].items():
        rows.append(["scale", f"{r['workers']} workers ({mode}): "
                     f"{results['scale']['target']}", _yes(r["met"])])
    rec = results["recovery"]
    rows.append(["recovery", rec["target"], _yes(rec["met"])])
    return _table(["part", "target", "this run"], rows)


def cold_tables(r: dict) -> str:
    c, b, w, i = r["cold_pgjob"], r["cold_bare"], r["restart"], r["initdb"]
    cold = _table(["", "steps (s)", "total (s)"], [
        ["pgjob", f"init {c['init_s']}, first serve {c['first_serve_s']}, first worker's "
                  f"tables {c.get('first_worker_s', '-')}", c["total_s"]],
        ["bare steps", f"initdb {b['initdb_s']}, pg_ctl start {b['pg_ctl_start_s']}, "
                       f"createdb {b['createdb_s']}, Optuna schema {b['optuna_schema_s']}",
         b["total_s"]]])
    warm = _table(["restart on an existing home", "seconds to first query"], [
        ["pgjob serve", w["pgjob_serve_s"]], ["pg_ctl start -w", w["pg_ctl_start_s"]],
        ["ratio", w["ratio"]]])
    sync = _table(["initdb", "seconds"], [["with sync (pgjob's choice)", i["initdb_sync_s"]],
                                         ["--no-sync", i["initdb_no_sync_s"]]])
    return f"{cold}\n{warm}\n{sync}"


def throughput_tables(r: dict) -> str:
    out = []
    rows = [x for x in r["rows"] if x["backend"] != "ratio"]
    counts = sorted({x["workers"] for x in rows})
    for sampler in ("random", "tpe"):
        mine = [x for x in rows if x["sampler"] == sampler]
        labels = list(dict.fromkeys(x["label"] for x in mine))
        table = []
        for label in labels:
            cells = {x["workers"]: x for x in mine if x["label"] == label}
            table.append([label] + [f"{cells[n]['trials_per_s']}" for n in counts])
        ratios = {x["workers"]: x for x in r["rows"]
                  if x["backend"] == "ratio" and x["sampler"] == sampler}
        for key, label in (("pgjob_vs_plain", "pgjob / plain, same server"),
                           ("journal_vs_plain", "pgjob journal / plain, same server"),
                           ("journal_vs_file", "pgjob journal / JournalFileBackend")):
            table.append([f"*{label}*"] + [f"*{ratios[n][key]}*" for n in counts])
        name = "RandomSampler" if sampler == "random" else "TPESampler"
        out.append(f"**{name}, trials/s** (workers across):\n\n"
                   + _table(["storage"] + [f"{n}" for n in counts], table))
        lat = [[label] + [_pct(next(x for x in mine if x["label"] == label
                                    and x["workers"] == n)["latency_ms"]) for n in counts]
               for label in labels]
        out.append(f"**{name}, per-trial latency in ms, p50 / p95 / p99:**\n\n"
                   + _table(["storage"] + [f"{n}" for n in counts], lat))
        cpu = [[label] + [_cpu(next(x for x in mine if x["label"] == label
                                    and x["workers"] == n)) for n in counts]
               for label in labels]
        out.append(f"**{name}, CPU time per trial in ms, worker processes + server:**\n\n"
                   + _table(["storage"] + [f"{n}" for n in counts], cpu))
    return "\n".join(out)


def journal_size_table(r: dict) -> str:
    return _table(["trials before", "rounds", "pgjob journal ms/trial", "in-memory ms/trial",
                   "storage overhead ms/trial", "pgjob journal latency p50 / p95 / p99",
                   "worker CPU ms/trial: journal / in-memory", "server CPU ms/trial"],
                  [[f"{x['prefill']:,}", x["rounds"], x["journal_ms"], x["memory_ms"],
                    f"**{x['overhead_ms']}**", _pct(x["journal_latency_ms"]),
                    f"{x['journal_worker_cpu_ms']} / {x['memory_worker_cpu_ms']}",
                    x["server_cpu_ms"]] for x in r["rows"]])


JOIN_CASES = {"fresh": "a fresh one", "oldest": "the oldest the throttle leaves",
              "none": "none"}


def journal_join_table(r: dict) -> str:
    rows = []
    for x in r["rows"]:
        for case, label in JOIN_CASES.items():
            y = x[case]
            covers = f"{y['upto']:,} of {y['logs']:,} logs, {y['mb']} MB" if "upto" in y \
                else "-"
            rows.append([f"{x['trials']:,}", label, covers, f"**{y['ready_s']}**",
                         y["storage_s"], y["study_s"], y["ask_s"], y["imports_s"]])
    return _table(["trials", "snapshot", "snapshot covers", "ready (s)",
                   "optuna_storage() (s)", "create_study (s)", "first ask (s)",
                   "imports before (s)"], rows)


def connections_table(r: dict) -> str:
    return _table(["storage", "threads per process", "peak (max / mean)", "idle (max / mean)"],
                  [[x["backend"], x["threads"], f"{x['peak_max']} / {x['peak_mean']}",
                    f"{x['idle_max']} / {x['idle_mean']}"] for x in r["rows"]])


def scale_table(r: dict) -> str:
    rows = []
    runs = list(r["modes"].items()) + [("one worker alone (the floor)", r["floor"])]
    for mode, x in runs:
        mem = x["server_memory"] or {}
        rows.append([mode, f"{x['connected']} / {x['workers']}", x["connect_all_s"],
                     x["trials"], x["errors"], _pct(x["latency_ms"]),
                     mem.get("pss_mb", "?"), mem.get("processes", "?"),
                     f"{x['server_cpu_share']:.2f} + {x['generator_cpu_share']:.2f}"])
    return _table(["mode", "connected", "connecting all (s)", "trials", "errors",
                   "trial storage work ms p50 / p95 / p99", "server memory PSS (MB)",
                   "server processes", "cores busy: server + load generator"], rows)


def settings_table(r: dict) -> str:
    return _table(["server settings", "changed from defaults", "trials/s",
                   "latency ms p50 / p95 / p99"],
                  [[x["settings"], ", ".join(f"{k}={v}" for k, v in x["changed"].items())
                    or "-", x["trials_per_s"], _pct(x["latency_ms"])] for x in r["rows"]])


def recovery_table(r: dict) -> str:
    return _table(["", "seconds after the kill"], [
        ["new server published (restart)", r["restart_s"]],
        ["workers completing trials again", r["recovery_s"]]])


def plot(results: dict, out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [x for x in results["throughput"]["rows"] if x["backend"] != "ratio"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=False)
    for ax, sampler in zip(axes, ("random", "tpe")):
        mine = [x for x in rows if x["sampler"] == sampler]
        for label in dict.fromkeys(x["label"] for x in mine):
            pts = sorted((x["workers"], x["trials_per_s"]) for x in mine if x["label"] == label)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks([p for p in sorted({x["workers"] for x in mine})])
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("worker processes")
        ax.set_ylabel("trials/s (log)")
        ax.set_title("RandomSampler" if sampler == "random" else "TPESampler")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    names = ["performance-throughput.png"]
    fig.savefig(out / names[0], dpi=110)
    plt.close(fig)

    rows = results["journal_size"]["rows"]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    places = range(len(rows))
    for key, label in (("journal_ms", "pgjob journal"), ("memory_ms", "in-memory (TPE alone)"),
                       ("overhead_ms", "storage overhead")):
        ax.plot(places, [max(x[key], 0.01) for x in rows], marker="o", label=label)
    ax.axhline(20, color="red", linestyle="--", linewidth=1, label="overhead target")
    ax.set_xticks(list(places), [f"{x['prefill']:,}" for x in rows])
    ax.set_yscale("log")
    ax.set_xlabel("finished trials in the study before")
    ax.set_ylabel("ms per trial, TPE (log)")
    ax.set_title("A journal home's study as it grows")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    names.append("performance-journal.png")
    fig.savefig(out / names[-1], dpi=110)
    plt.close(fig)

    modes = results["scale"]["modes"]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for i, (mode, x) in enumerate(modes.items()):
        vals = [x["latency_ms"][p] for p in ("p50", "p95", "p99")]
        ax.bar([j + i * 0.35 for j in range(3)], vals, width=0.35, label=mode)
    ax.axhline(50, color="red", linestyle="--", linewidth=1, label="p95 target")
    ax.set_xticks([j + 0.17 for j in range(3)], ["p50", "p95", "p99"])
    ax.set_ylabel("ms per trial's storage work")
    ax.set_title(f"{next(iter(modes.values()))['workers']} simulated workers")
    ax.legend(fontsize=8)
    fig.tight_layout()
    names.append("performance-scale.png")
    fig.savefig(out / names[-1], dpi=110)
    plt.close(fig)
    return names


def write(results: dict, out: Path) -> Path:
    """performance.json, the plots and performance.md, all into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "performance.json").write_text(json.dumps(results, indent=2) + "\n")
    images = plot(results, out)
    findings = FINDINGS.read_text() if FINDINGS.exists() else ""
    quick = "\n**This is a quick smoke run: its numbers mean nothing.**\n" \
        if results["quick"] else ""
    md = f"""# Performance

Every table below comes from one run of `./dev bench` (or `python benchmarks/run.py`) on the
machine described here; `performance.json` next to this page holds the same numbers. The
page is written by `benchmarks/report.py`; only the findings section is written by hand
(`benchmarks/findings.md`), and it must agree with the tables.
{quick}
## The machine and versions

{machine_table(results["machine"])}
## Targets

{targets_table(results)}
{findings}
## 1. Cold start

{cold_tables(results["cold_start"])}
## 2. Trial throughput

{results["throughput"]["trials_per_worker"]["random"]} (RandomSampler) and
{results["throughput"]["trials_per_worker"]["tpe"]} (TPESampler) trials per worker process, objective `x**2 + y**2` over two floats, each
run in a new study (and the journals, pgjob's and the file, emptied first: section 6
shows what a large journal costs); the median of {results["throughput"]["rounds"]} alternating rounds for
pgjob, pgjob journal, JournalFileBackend and plain on the same server (the rdb home's;
the journal home's server is a second pgjob server, set up alike). Latency is the time
from one trial's end to the next one's end in a worker: the sampler plus the storage, the
objective costs nothing.

![trials per second](./{images[0]})

{throughput_tables(results["throughput"])}
## 3. Connections per worker process

{connections_table(results["connections"])}
## 4. A thousand workers

Each simulated worker does one trial's storage work every {results["scale"]["period_s"]:.0f} s
for {results["scale"]["duration_s"]:.0f} s (see `benchmarks/scale.py` for the statements).

![latency at scale](./{images[2]})

{scale_table(results["scale"])}
## 5. Server settings

{settings_table(results["server_settings"])}
## 6. A journal home's study as it grows

One worker runs {results["journal_size"]["trials"]} trials with TPESampler after the study was
prefilled: its logs written straight into the journal, 4 per trial as Optuna writes them
(`benchmarks/prefill.py`). Optuna offers a snapshot every 100th trial, so a run of 100
holds exactly one offer (and pays for pickling the whole study once). A snapshot is in
place, as in a study that has been running. In-memory is the same worker and the same
trials on `InMemoryStorage`: the sampler's own cost. Storage overhead = pgjob journal
minus in-memory. The median of the rounds shown, each on a study filled anew.

![ms per trial as the study grows](./{images[1]})

{journal_size_table(results["journal_size"])}
## 7. A new worker joining a large journal study

A new process, from `pgjob.optuna_storage()` to its first `study.ask()` returning (with
`create_study(load_if_exists=True)` between), median of {results["journal_join"]["repeats"]};
its imports, before that, are apart. The study's logs are written straight into the journal
(4 per trial). "The oldest the throttle leaves": a worker saves a new snapshot only once the
journal has grown by a quarter since the last, so a joining worker may find one that
covers only 80 % of the logs. Saving a snapshot stalls the saving worker's ask:
{", ".join(f"{x['save_s']} s at {x['trials']:,} trials" for x in results["journal_join"]["rows"])}.

{journal_join_table(results["journal_join"])}
## Recovery from a killed server

{recovery_table(results["recovery"])}"""
    page = out / "performance.md"
    page.write_text(md)
    return page


if __name__ == "__main__":  # re-render the page from a run's JSON, e.g. after editing findings.md
    import sys

    source = Path(sys.argv[1] if len(sys.argv) > 1 else HERE.parent / "docs" / "performance.json")
    print(write(json.loads(source.read_text()), source.parent))
