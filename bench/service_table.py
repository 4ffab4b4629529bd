"""README's service table, regenerated from the committed JSON reports under ``reports/service/``.

    .venv/bin/python bench/service_table.py            # rewrite the table in README.md
    .venv/bin/python bench/service_table.py --print    # only print it

The table sits between ``<!-- service-table:start -->`` and ``<!-- service-table:end -->``; every figure in
it is read from a report (a missing report leaves its rows out, it never invents them).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REPORTS = REPO / "reports" / "service"
START, END = "<!-- service-table:start -->", "<!-- service-table:end -->"


def _load(name: str) -> dict | None:
    path = REPORTS / name
    return json.loads(path.read_text()) if path.is_file() else None


def _x(ratio: dict) -> str:
    return f"{ratio['median']:.2f}x (rounds {ratio['min']:.2f}–{ratio['max']:.2f})"


def _pct(ratio: dict) -> str:
    return f"{100 * ratio['median']:.0f}% (rounds {100 * ratio['min']:.0f}–{100 * ratio['max']:.0f}%)"


def cost_rows(r: dict) -> list[str]:
    """Rows of ``bench/serve_cost.py``'s report."""
    ip, load, ratios, c = r["in_process"], r["load"], r["ratios"], r["config"]
    pg = load["pathguard"]
    engine = r["bundle"]["engine"]
    rows = [
        f"| one image over loopback, median (KServe v2, 1 worker) | {r['single']['pathguard_ms']:.2f} ms = "
        f"{_x(ratios['single_latency_vs_in_process'])} in-process screening ({ip['single_ms']:.2f} ms) |",
        f"| {c['callers']} callers, 1 real image per call, server on 1 core, client (tritonclient) on the other | "
        f"{pg['images_per_s']:.0f} images/s, p50 {pg['p50_ms']:.0f} ms, p99 {pg['p99_ms']:.0f} ms; "
        f"**{_pct(ratios['throughput_vs_in_process_batch_32'])}** of in-process batches of 32 "
        f"({ip['batch_32_images_per_s']:.0f}/s), {_pct(ratios['throughput_vs_in_process_mean_batch'])} of "
        f"batches of {ip['mean_batch']:.0f}, the mean batch it formed ({ip['mean_batch_images_per_s']:.0f}/s); "
        f"per CPU-second {_pct(ratios['cpu_normalized_vs_in_process_batch_32'])} of batches of 32 |",
        f"| server CPU per one-image call | {r['per_call']['server_cpu_us']:.0f} µs: model "
        f"{r['per_call']['model_cpu_us']:.0f} µs + **{r['per_call']['beyond_model_cpu_us']:.0f} µs** beyond it |",
    ]
    if "stages" in r:
        stages = ", ".join(f"{k} {v:.0f}" for k, v in r["stages"]["cpu_us_per_call"].items())
        rows.append(f"| the same by stage (py-spy samples, µs per call) | {stages} |")
    if "pathguard_workers" in load:
        w, one = load["pathguard_workers"], load["pathguard_conns"]
        rows.append(
            f"| `--workers 2` on both cores (the client shares them), one connection per caller | "
            f"{w['images_per_s']:.0f} images/s, p99 {w['p99_ms']:.0f} ms: "
            f"{_x(ratios['workers_vs_one_worker'])} one worker on one core ({one['images_per_s']:.0f}/s, "
            f"client on the other core, same connections) |"
        )
    if "pathguard_threads2" in load:
        t = load["pathguard_threads2"]
        rows.append(
            f"| one worker with 2 torch threads on both cores, same client | {t['images_per_s']:.0f} "
            f"images/s, p99 {t['p99_ms']:.0f} ms: {_x(ratios['threads2_vs_one_worker'])} one worker on one "
            f"core |"
        )
    if "mlserver" in load:
        m = load["mlserver"]
        rows.append(
            f"| Seldon MLServer, adaptive batching, same screener, core 0 | {m['images_per_s']:.0f} "
            f"images/s, p99 {m['p99_ms']:.0f} ms; PathGuard {_x(ratios['throughput_vs_mlserver'])} "
            f"(per server CPU-second {_x(ratios['cpu_normalized_vs_mlserver'])}) |"
        )
    if "kserve" in load:
        k = load["kserve"]
        rows.append(
            f"| KServe Python server (**no batching**), same screener, core 0 | {k['images_per_s']:.0f} "
            f"images/s, p99 {k['p99_ms']:.0f} ms; PathGuard {_x(ratios['throughput_vs_kserve'])} |"
        )
    rows.append(f"| (engine, threads) | {engine} engine, {c['threads']} torch thread per process everywhere |")
    return rows


def load_rows() -> list[str]:
    """Rows of ``bench/load.py`` and ``bench/fuzz.py`` reports."""
    rows = []
    if (d := _load("load.json")) is not None:
        lat, rss = d["latency_ok_ms"], d["rss"]
        rows.append(
            f"| {d['config']['callers']} callers for {d['config']['duration']:.0f} s, "
            f"{100 * d['config']['invalid_fraction']:.0f}% deliberately invalid | {d['calls']:,} calls, "
            f"{d['throughput_ok_per_s']:.0f}/s, p50 {lat['p50']:.0f} ms, p99 {lat['p99']:.0f} ms; "
            f"{d['errors']['count']} errors, {d['accounting']['lost']} lost, resident memory "
            f"{rss['start_mb']:.0f} -> {rss['end_mb']:.0f} MB |"
        )
    if (d := _load("load_8_images_per_call.json")) is not None:
        rows.append(
            f"| {d['config']['callers']} callers, {d['config']['images_per_request']} images per call | "
            f"{d['images_ok_per_s']:.0f} images/s, p99 {d['latency_ok_ms']['p99']:.0f} ms |"
        )
    if (d := _load("load_sigterm.json")) is not None:
        drain = d["server"]["drain"]
        rows.append(
            f"| SIGTERM {d['config']['sigterm_at']:.0f} s into that load | exit {d['server']['exit_code']}, "
            f"{d['accounting']['lost']} accepted calls lost ({drain['finished_during_drain']} finished "
            f"while draining, {drain['cut_off']} cut off) |"
        )
    if (d := _load("load_reload.json")) is not None:
        reloads = [e for e in d["events"] if e["event"] == "reload"]
        swaps = ", ".join(f"{e['seconds']:.2f}" for e in reloads)
        rows.append(
            f"| {len(reloads)} bundle reloads (SIGHUP) during load | {d['errors']['count']} failed calls, "
            f"swaps of {swaps} s |"
        )
    if (d := _load("fuzz.json")) is not None:
        codes = ", ".join(sorted({key.rsplit(":", 1)[-1] for key in d["codes"]}))
        rows.append(
            f"| {d['cases']:,} fuzzed requests (hypothesis) | only {codes}; "
            f"{d['violation_count']} violations, alive at the end: {d['alive_at_end']} |"
        )
    return rows


def table() -> str:
    rows = []
    if (cost := _load("serve_cost.json")) is not None:
        rows += cost_rows(cost)
    rows += load_rows()
    return "\n".join(["| what | figure |", "|---|---|", *rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--print", action="store_true", help="print the table instead of rewriting README.md")
    parser.add_argument("--readme", default=str(REPO / "README.md"))
    args = parser.parse_args(argv)
    text = table()
    if args.print:
        print(text)
        return 0
    readme = Path(args.readme)
    content = readme.read_text()
    if START not in content or END not in content:
        print(f"{readme}: no {START} ... {END} markers", file=sys.stderr)
        return 1
    head, rest = content.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{text}\n{END}{tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
