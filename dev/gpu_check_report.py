"""The GPU check's verdicts and its summary.md, from what the stages left under $OUT.

    python dev/gpu_check_report.py --out OUT --stage 'smoke|ran|0|41.2|90|' ... [--final] [--dry-run]

dev/gpu_check.sh calls this after every stage (so a run killed at any point leaves a summary
saying how far it got) and once more at exit (--final). It reads the logs, never trusts an
exit code alone, and never calls a stage "ok" that skipped its checks: a GPU run whose CUDA
tests all skipped, a smoke with a missing case, a sanitizer run that timed out before its
summary line, a bench without its step rows, each is a failure.

Pure Python, no torch: it must work even when the environment it reports on is broken.
The first line of summary.md is the verdict; its exit code is 0 for ok, 1 otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]

# The files under $OUT (the device returns at most 8): the stage logs, in stage order.
FILES = {
    "env_build": ["build.log"],
    "smoke": ["smoke.jsonl", "smoke.log"],
    "tests": ["tests.log"],
    "sanitizer": ["sanitizer.log"],
    "bench": ["bench.log", "bench.json"],
    "summary": ["summary.md"],
}
STAGES = [("env_build", "1. environment + build"), ("smoke", "2. smoke"), ("tests", "3. tests (pytest -m gpu)"),
          ("sanitizer", "4. compute-sanitizer"), ("bench", "5. bench"), ("summary", "6. summary")]
SANITIZER_TOOLS = ("memcheck", "racecheck", "initcheck", "synccheck")
TIMEOUT_CODES = (124, 137)  # timeout(1): the limit was reached (TERM), or it had to KILL
SMOKE_PASS = "pass"


@dataclass
class Stage:
    """What the shell knows about one stage (or one sanitizer tool)."""
    name: str
    state: str            # ran | skipped | not-run | running
    rc: Optional[int] = None
    seconds: float = 0.0
    limit: float = 0.0
    note: str = ""

    @classmethod
    def parse(cls, text: str) -> "Stage":
        name, state, rc, seconds, limit, note = (text.split("|", 5) + [""] * 6)[:6]
        return cls(name, state, int(rc) if rc.strip().lstrip("-").isdigit() else None,
                   float(seconds or 0), float(limit or 0), note)

    @property
    def timed_out(self) -> bool:
        return self.state == "ran" and self.rc in TIMEOUT_CODES


@dataclass
class Verdict:
    ok: bool
    verdict: str                      # "ok", "FAILED", "skipped: no GPU", ...
    numbers: str = ""                 # the key numbers, one line
    problems: list = field(default_factory=list)  # for the first line when not ok
    details: str = ""                 # a Markdown section for below the table


# ---- smoke -----------------------------------------------------------------------------------

def _ratio(value) -> Optional[float]:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("inf")


def smoke_cases(rows: list) -> list:
    """Case rows, one per (op, backend, index): the first row written for a case wins (the child's
    own row, ahead of any the parent wrote when it saw the process die)."""
    seen, cases = set(), []
    for r in rows:
        if r.get("kind") != "case":
            continue
        key = (r["op"], r["backend"], r["index"])
        if key not in seen:
            seen.add(key)
            cases.append(r)
    return cases


def smoke_summary(rows: list, gpu: bool) -> tuple:
    """("ok" | "FAILED", one line of numbers). On a GPU a skipped case is a failure too."""
    plan = next((r for r in rows if r.get("kind") == "plan"), None)
    cases = smoke_cases(rows)
    counts: dict = {}
    for r in cases:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    planned = plan["cases"] if plan else None
    missing = (planned - len(cases)) if planned is not None else 0
    bad = {k: v for k, v in counts.items() if k not in (SMOKE_PASS, "skip")}
    skipped = counts.get("skip", 0)
    ok = plan is not None and missing == 0 and not bad and (not gpu or skipped == 0) and counts.get(SMOKE_PASS, 0) > 0
    numeric = [r for r in cases if r["check"] == "numerics" and r["status"] == SMOKE_PASS]
    worst = max(numeric, key=lambda r: _ratio(r.get("worst_ratio")) or 0.0, default=None)
    det = [r for r in cases if r["check"] == "determinism"]
    parts = [f"{counts.get(SMOKE_PASS, 0)}/{planned if planned is not None else '?'} cases pass"]
    parts += [f"{v} {k}" for k, v in sorted(bad.items())]
    if skipped:
        parts.append(f"{skipped} skipped" + (" (a GPU run must run every case)" if gpu else ""))
    if missing > 0:
        parts.append(f"{missing} never reported")
    if plan is None:
        parts.append("no plan row: the smoke did not start")
    if worst is not None:
        parts.append(f"worst error {(_ratio(worst['worst_ratio']) or 0):.2f} of its bound "
                     f"({worst['op']} {worst['backend']} {worst['dtype']} {worst['shape']} {worst['worst_output']})")
    if det:
        parts.append(f"deterministic {sum(r['status'] == SMOKE_PASS for r in det)}/{len(det)}")
    return ("ok" if ok else "FAILED"), ", ".join(parts)


def _smoke_cell(group: list) -> str:
    if not group:
        return ""
    passed = sum(r["status"] == SMOKE_PASS for r in group)
    skipped = sum(r["status"] == "skip" for r in group)
    text = f"{passed}/{len(group)}"
    if skipped:
        text += f" ({skipped} skip)"
    if passed + skipped < len(group):
        text = f"**{text}**"
    return text


def smoke_table(rows: list) -> str:
    """One line per op: passes per backend x dtype, determinism, the worst error and the slowest case."""
    cases = smoke_cases(rows)
    ops = list(dict.fromkeys(r["op"] for r in cases))
    combos = [(b, d) for b in ("cuda", "triton") for d in ("float32", "bfloat16")]
    short = {"float32": "fp32", "bfloat16": "bf16"}
    lines = ["| op | " + " | ".join(f"{b} {short[d]}" for b, d in combos)
             + " | deterministic | worst error / bound | slowest case |",
             "| --- |" + " ---: |" * len(combos) + " --- | --- | --- |"]
    for op in ops:
        mine = [r for r in cases if r["op"] == op]
        num = [r for r in mine if r["check"] == "numerics"]
        cells = [_smoke_cell([r for r in num if r["backend"] == b and r["dtype"] == d]) for b, d in combos]
        det = [r for r in mine if r["check"] == "determinism"]
        det_cell = ", ".join(f"{r['backend']} {'yes' if r['status'] == SMOKE_PASS else r['status']}" for r in det) \
            or "n/a"
        rated = [r for r in num if r.get("worst_ratio") is not None]
        worst = max(rated, key=lambda r: _ratio(r["worst_ratio"]), default=None)
        worst_cell = "" if worst is None else (
            f"{_ratio(worst['worst_ratio']):.2f} ({worst['backend']} {short.get(worst['dtype'], worst['dtype'])} "
            f"{worst['shape']} {worst['worst_output']})")
        slow = max(mine, key=lambda r: r.get("seconds") or 0.0, default=None)
        slow_cell = "" if slow is None else f"{slow['seconds']:.1f} s ({slow['backend']} {slow['shape']})"
        lines.append(f"| {op} | " + " | ".join(cells) + f" | {det_cell} | {worst_cell} | {slow_cell} |")
    failing = [r for r in cases if r["status"] not in (SMOKE_PASS, "skip", "not run")]
    not_run: dict = {}
    for r in cases:
        if r["status"] == "not run":
            not_run.setdefault((r["backend"], r.get("message", "")), []).append(r["op"])
    if failing or not_run:
        lines += ["", "Failing cases:"]
        for r in failing[:40]:
            what = r.get("message") or f"worst {r.get('worst_output')} at {r.get('worst_ratio')} of its bound"
            lines.append(f"- {r['status']}: {r['backend']} {r['case']}: {what[:400]}")
        if len(failing) > 40:
            lines.append(f"- ... and {len(failing) - 40} more (smoke.jsonl)")
        for (backend, why), ops in not_run.items():
            lines.append(f"- not run: {len(ops)} {backend} cases ({', '.join(dict.fromkeys(ops))}): {why}")
    skips: dict = {}
    for r in cases:
        if r["status"] == "skip":
            key = (r["backend"], (r.get("message") or "").strip().splitlines()[0][:300] if r.get("message") else "")
            skips.setdefault(key, []).append(r["op"])
    if skips:
        lines += ["", "Skipped:"]
        lines += [f"- {b} {', '.join(dict.fromkeys(ops))} ({len(ops)} cases): {m}"
                  for (b, m), ops in list(skips.items())[:20]]
    return "\n".join(lines) + "\n"


def judge_smoke(stage: Stage, out: Path, gpu: bool) -> Verdict:
    path = out / "smoke.jsonl"
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a kill
    verdict, numbers = smoke_summary(rows, gpu)
    problems = [] if verdict == "ok" else [f"smoke: {numbers}"]
    if stage.timed_out:
        verdict, problems = "FAILED", problems + [f"smoke: stopped at its {stage.limit:.0f} s limit"]
    elif stage.state == "ran" and stage.rc not in (0, None) and verdict == "ok":
        verdict, problems = "FAILED", [f"smoke: exit code {stage.rc}"]
    details = smoke_table(rows) if rows else "No smoke rows were written.\n"
    return Verdict(verdict == "ok", verdict, numbers, problems, details)


# ---- tests -----------------------------------------------------------------------------------

_RESULT_LINE = re.compile(r"^(tests/\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b(.*)$")
_FINAL_COUNTS = re.compile(r"(\d+) (failed|passed|skipped|errors?|xfailed|xpassed|deselected)\b")
# A skip that means the GPU or the backend was not there: on a GPU that is a failure, not a skip.
_UNAVAILABLE = re.compile(r"unavailable|needs a CUDA GPU|cannot run here|no CUDA GPU|not built", re.IGNORECASE)


def judge_tests(stage: Stage, out: Path, gpu: bool) -> Verdict:
    text = (out / "tests.log").read_text(errors="replace") if (out / "tests.log").exists() else ""
    results: dict = {}
    skip_reasons: dict = {}
    for line in text.splitlines():
        m = _RESULT_LINE.match(line.strip())
        if m:
            results[m.group(1)] = m.group(2)
            if m.group(2) == "SKIPPED":
                reason = m.group(3).strip().strip("()").rsplit("[", 1)[0].strip().rstrip(")")
                skip_reasons[reason] = skip_reasons.get(reason, 0) + 1
    final = [line for line in text.splitlines()
             if re.match(r"^=+ .*\b(passed|failed|error|skipped)\b.* in [\d.]+s", line)]
    counts = {}
    if final:
        for n, what in _FINAL_COUNTS.findall(final[-1]):
            counts[what.rstrip("s") if what.startswith("error") else what] = int(n)
    else:  # stopped before pytest's last line: count what it printed
        for status in results.values():
            key = {"PASSED": "passed", "FAILED": "failed", "ERROR": "error", "SKIPPED": "skipped"}.get(status)
            if key:
                counts[key] = counts.get(key, 0) + 1
    failing = [name for name, status in results.items() if status in ("FAILED", "ERROR")]
    failing += [line.split()[1] for line in text.splitlines()
                if line.startswith(("FAILED ", "ERROR ")) and len(line.split()) > 1 and line.split()[1] not in failing]
    cuda_passed = sum(1 for name, s in results.items() if s == "PASSED" and re.search(r"\[[^\]]*cuda[^\]]*\]", name))
    unavailable = {r: n for r, n in skip_reasons.items() if _UNAVAILABLE.search(r)}
    problems = []
    if stage.timed_out:
        problems.append(f"tests: stopped at the {stage.limit:.0f} s limit")
    if counts.get("failed") or counts.get("error"):
        problems.append(f"tests: {counts.get('failed', 0)} failed, {counts.get('error', 0)} errors")
    if gpu and unavailable:
        problems.append(f"tests: {sum(unavailable.values())} skipped because a backend or the GPU was unavailable")
    if gpu and cuda_passed == 0:
        problems.append("tests: no [cuda] test passed (every CUDA test skipped or failed)")
    if not counts.get("passed"):
        problems.append("tests: nothing passed")
    if stage.state == "ran" and stage.rc not in (0, None) and not problems:
        problems.append(f"tests: pytest exit code {stage.rc}")
    numbers = ", ".join(f"{v} {k}" for k, v in counts.items()) or "no results"
    numbers += f"; [cuda] tests passed: {cuda_passed}"
    if final:
        m = re.search(r" in ([\d.]+)s", final[-1])
        numbers += f"; {m.group(1)} s" if m else ""
    details = []
    if failing:
        details += ["Failing tests:", ""] + [f"- `{name}`" for name in failing[:60]]
        if len(failing) > 60:
            details.append(f"- ... and {len(failing) - 60} more (tests.log)")
        details.append("")
    if skip_reasons:
        details += ["Skipped tests, by reason:", ""]
        details += [f"- {n} x {reason}" for reason, n in sorted(skip_reasons.items(), key=lambda kv: -kv[1])[:20]]
    return Verdict(not problems, "ok" if not problems else "FAILED", numbers, problems,
                   "\n".join(details) + "\n" if details else "")


# ---- sanitizer -------------------------------------------------------------------------------

_ERROR_SUMMARY = re.compile(r"ERROR SUMMARY: (\d+) errors?")
_RACE_SUMMARY = re.compile(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)")
_DRIVER_DONE = re.compile(r"cuda_driver: (\d+) cases in ([\d.]+) s")
_WHERE = re.compile(r"\bat (.+?) in (\S+\.(?:cu|cuh|cpp|h):\d+)")


def sanitizer_blocks(text: str) -> dict:
    """tool -> its part of sanitizer.log (between the shell's '===== compute-sanitizer <tool>' lines)."""
    blocks, current = {}, None
    for line in text.splitlines():
        m = re.match(r"^===== compute-sanitizer (\w+):", line)
        if m:
            current = m.group(1)
            blocks.setdefault(current, [])
        if current:
            blocks[current].append(line)
    return {tool: "\n".join(lines) for tool, lines in blocks.items()}


def judge_sanitizer_tool(stage: Stage, block: str) -> tuple:
    """(ok, short result, full result) for one tool."""
    tool = stage.name.split(":", 1)[1]
    if stage.state != "ran":
        text = f"{tool}: {stage.state}" + (f" ({stage.note})" if stage.note else "")
        return False, f"{tool} {stage.state}", text
    if stage.timed_out:
        return False, f"{tool} timeout", f"{tool}: stopped at its {stage.limit:.0f} s limit, no summary"
    driver = _DRIVER_DONE.search(block)
    race = _RACE_SUMMARY.search(block) if tool == "racecheck" else None
    if race:
        errors, hazards = int(race.group(2)), int(race.group(1))
        text = f"{hazards} hazards ({errors} errors, {race.group(3)} warnings)"
        short = f"{tool} {hazards} hazards"
    else:
        m = _ERROR_SUMMARY.search(block)
        errors = hazards = int(m.group(1)) if m else None
        text = f"{errors} errors" if m else "no ERROR SUMMARY line"
        short = f"{tool} {errors} errors" if m else f"{tool} no summary"
    where = list(dict.fromkeys(f"{w[0].split('(')[0].strip()} ({w[1].rsplit('/', 1)[-1]})"
                               for w in _WHERE.findall(block)))[:4]
    ok = stage.rc == 0 and errors == 0 and hazards == 0 and driver is not None
    text += f", {driver.group(1)} driver cases" if driver else ", the driver did not finish"
    if stage.rc not in (0, None):
        text += f", exit {stage.rc}"
        short += f" (exit {stage.rc})"
    text += f", {stage.seconds:.0f} s"
    if where:
        text += "; at " + "; ".join(where)
    raw = [line.strip() for line in block.splitlines() if "SUMMARY:" in line]
    if raw:  # the tool's own summary line, verbatim
        text += f" (`{raw[-1]}`)"
    return ok, short, f"{tool}: {text}"


def judge_sanitizer(stages: list, out: Path) -> Verdict:
    text = (out / "sanitizer.log").read_text(errors="replace") if (out / "sanitizer.log").exists() else ""
    blocks = sanitizer_blocks(text)
    results = [judge_sanitizer_tool(s, blocks.get(s.name.split(":", 1)[1], "")) for s in stages]
    problems = [f"sanitizer {line}" for ok, _, line in results if not ok]
    missing = [t for t in SANITIZER_TOOLS if t not in {s.name.split(":", 1)[1] for s in stages}]
    if missing:
        problems.append(f"sanitizer: {', '.join(missing)} did not run")
    ok = not problems
    numbers = ", ".join(short for _, short, _ in results) or "no tool ran"
    details = "".join(f"- {line}\n" for _, _, line in results)
    return Verdict(ok, "ok" if ok else "FAILED", numbers, problems, details)


# ---- bench -----------------------------------------------------------------------------------

def judge_bench(stage: Stage, out: Path, gpu: bool, expect_cuda: bool) -> Verdict:
    path = out / "bench.json"
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        why = f"bench: no results ({type(err).__name__})"
        if stage.timed_out:
            why += f"; stopped at its {stage.limit:.0f} s limit"
        return Verdict(False, "FAILED", "no bench.json", [why])
    rows = payload.get("rows", [])
    steps = {r["impl"]: r for r in rows if r["op"] == "train_step"}
    kernel_rows = [r for r in rows if r["op"] != "train_step"]
    problems = [f"bench: {f}" for f in payload.get("failures", [])]
    if not payload.get("complete"):
        problems.append(f"bench: stopped during {payload.get('running')!r}"
                        + (f" at its {stage.limit:.0f} s limit" if stage.timed_out else ""))
    # the kernel backends' rows may say where they ran ("cuda (CPU simulator)"); the baseline must
    # be the compiled one on a GPU (an eager fallback row means torch.compile failed)
    have = set(steps) | {impl.split(" (")[0] for impl in steps}
    wanted = (["cuda"] if expect_cuda else []) + ["triton"]
    wanted.append("torch.compile (nanoGPT-style)" if gpu else "torch eager (nanoGPT-style)")
    for impl in wanted:
        if impl not in have:
            problems.append(f"bench: no train_step row for {impl}")
    if gpu:
        impls = {r["impl"] for r in kernel_rows}
        for impl in ("cuda", "triton"):
            if impl not in impls:
                problems.append(f"bench: no kernel rows for {impl}")
    parts = []
    for impl, r in steps.items():
        mfu = f", MFU {100 * r['mfu']:.1f}%" if r.get("mfu") is not None else ""
        peak = f", {r['peak_memory_bytes'] / 2**30:.1f} GiB" if r.get("peak_memory_bytes") else ""
        parts.append(f"{impl}: {r['tokens_per_s']:,.0f} tok/s{mfu}{peak}")
    numbers = "; ".join(parts) or "no step rows"
    if gpu:
        numbers = f"{len(kernel_rows)} kernel rows; step " + numbers
    try:
        from bench import run  # dev/bench/run.py, beside this file (its report code needs no torch)

        report = run.markdown_from_payload(payload)
        stem = run.results_stem(payload["environment"])
        head = (f"Commit this summary as `dev/bench/results/{stem}.md` and `bench.json` as "
                f"`dev/bench/results/{stem}.json`.\n\n") if gpu else ""
        details = head + re.sub(r"^# ", "### ", report, flags=re.MULTILINE)
    except Exception as err:  # noqa: BLE001 - the numbers above still stand
        details = f"The bench report could not be rendered: {type(err).__name__}: {err}\n"
    if not gpu:
        numbers = "CPU step row only (tiny model; the GPU bench: skipped: no GPU): " + numbers
    return Verdict(not problems, "ok" if not problems else "FAILED", numbers, problems, details)


# ---- environment + build ---------------------------------------------------------------------

def read_env(out: Path) -> dict:
    """The probe's ENV-JSON line in build.log (the shell's environment probe prints it)."""
    path = out / "build.log"
    if not path.exists():
        return {}
    env = {}
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("ENV-JSON "):
            try:
                env.update(json.loads(line[len("ENV-JSON "):]))
            except json.JSONDecodeError:
                pass
    return env


def judge_env_build(stage: Stage, env: dict, dry_run: bool) -> Verdict:
    cuda = env.get("cuda_backend", "unknown")
    facts = f"torch {env.get('torch', '?')}, triton {env.get('triton', '?')}; cuda backend: {cuda}"
    if dry_run:
        ok = stage.state == "ran" and stage.rc == 0
        return Verdict(ok, "skipped: no GPU" if ok else "FAILED",
                       f"build of _C skipped; environment: {facts}",
                       [] if ok else [f"environment: {stage.note or f'exit {stage.rc}'}"])
    if stage.state == "ran" and stage.rc == 0:
        build = env.get("build_seconds")
        numbers = (f"built for sm_{env.get('arch', '90')}" + (f" in {build:.0f} s" if build else "")
                   + f" with {env.get('jobs', '?')} jobs; {env.get('gpu', '?')}, driver {env.get('driver', '?')}; "
                   + facts)
        return Verdict(True, "ok", numbers)
    why = stage.note or (f"stopped at its {stage.limit:.0f} s limit" if stage.timed_out else f"exit {stage.rc}")
    return Verdict(False, "FAILED", facts, [f"environment + build: {why}"])


# ---- the summary -----------------------------------------------------------------------------

def _cell(text: str) -> str:
    """Text for one cell of a Markdown table: one line, no bare '|'."""
    return " ".join(str(text).split()).replace("|", "\\|")


def header_line(env: dict, started: Optional[float], budget: float) -> str:
    parts = []
    if env.get("gpu"):
        parts.append(f"{env['gpu']}" + (f", driver {env['driver']}" if env.get("driver") else ""))
    for key, label in (("torch", "torch"), ("cuda_torch", "CUDA (torch)"), ("cuda_runtime_C", "CUDA runtime (_C)"),
                       ("triton", "triton"), ("python", "Python"), ("nvcc", "nvcc")):
        if env.get(key):
            parts.append(f"{label} {env[key]}")
    parts.append(datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    if started:
        elapsed = datetime.datetime.now().timestamp() - started
        parts.append(f"{elapsed:.0f} s of the {budget:.0f} s budget")
    return " · ".join(parts)


def ptxas_section(table: str, arch: str) -> str:
    """dev/ptxas_report.py's table, folded (one row per kernel instance: hundreds), under a line
    that counts the instances and names the ones that spill."""
    rows = [line.split("|") for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    rows = [r for r in rows if len(r) > 6 and r[1].strip() != "file"]
    spilling = [f"{r[1].strip()} {r[2].strip()}" for r in rows if r[4].strip() not in ("0", "") or
                r[5].strip() not in ("0", "")]
    head = f"{len(rows)} kernel instances, {len(spilling)} spilling"
    head += f": {', '.join(spilling[:10])}" if spilling else ""
    return (f"## ptxas report (dev/ptxas_report.py, sm_{arch})\n\n{head}\n\n<details><summary>every kernel instance"
            f"</summary>\n\n{table.strip()}\n\n</details>\n")


def summarize(out: Path, stages: list, *, dry_run: bool, final: bool, started: Optional[float] = None,
              budget: float = 480.0, ptxas_md: Optional[Path] = None) -> tuple:
    """(exit code, summary.md text)."""
    gpu = not dry_run
    env = read_env(out)
    by_name = {s.name: s for s in stages}
    rows, problems, not_run, sections = [], [], [], []
    next_stage = None
    for key, title in STAGES:
        if key == "bench":
            title = "5. bench (run.py --dry-run: the step row on the CPU)" if dry_run else "5. bench (run.py --quick)"
        files = ", ".join(f for f in FILES[key] if (out / f).exists() or key == "summary") or "-"
        if key == "summary":
            rows.append(f"| {title} | written | {'final' if final else 'partial: the check was still running'} "
                        f"| {files} |")
            continue
        tool_stages = [s for s in stages if s.name.startswith("sanitizer:")] if key == "sanitizer" else []
        stage = by_name.get(key)
        if key == "sanitizer" and tool_stages:
            # one row for the four tools; "not run" when none of them started
            started_tools = [s for s in tool_stages if s.state != "not-run"]
            stage = Stage("sanitizer", "ran") if started_tools else \
                Stage("sanitizer", "not-run", note=tool_stages[0].note)
        if stage is None or stage.state in ("not-run", "running"):
            why = "running when this summary was written" if stage is not None and stage.state == "running" else \
                (stage.note if stage is not None and stage.note else "not run")
            if next_stage is None:
                next_stage = title
            if not dry_run or key in ("smoke", "bench", "env_build"):
                not_run.append(f"{title.split('. ', 1)[1]}: {why}")
            state = "not run" if stage is None or stage.state == "not-run" else "running or killed"
            rows.append(f"| {title} | {state} | {_cell(why)} | {files} |")
            continue
        if stage.state == "skipped":
            verdict = Verdict(dry_run, f"skipped: {stage.note}", "")
            if not dry_run:
                problems.append(f"{title.split('. ', 1)[1]}: skipped ({stage.note})")
        elif key == "env_build":
            verdict = judge_env_build(stage, env, dry_run)
        elif key == "smoke":
            verdict = judge_smoke(stage, out, gpu)
        elif key == "tests":
            verdict = judge_tests(stage, out, gpu)
        elif key == "sanitizer":
            verdict = judge_sanitizer(tool_stages, out)
        else:
            verdict = judge_bench(stage, out, gpu, expect_cuda=env.get("cuda_backend", "").startswith(
                ("available", "simulated")))
        problems += verdict.problems
        limit = f" ({stage.seconds:.0f} s of {stage.limit:.0f})" if stage.limit else ""
        rows.append(f"| {title} | {_cell(verdict.verdict)}{limit} | {_cell(verdict.numbers)} | {files} |")
        if verdict.details:
            sections.append(f"## {title}\n\n{verdict.details}")

    # The first line names what went wrong in the stages that ran; the stages a failure kept
    # from running come after (they follow from it), and alone only when nothing else failed.
    problems += not_run
    first_problems = [p for p in problems if p not in not_run] or problems
    if not final:
        first = f"# GPU check: INCOMPLETE (still running, or killed, at {next_stage or 'the summary'})"
        code = 1
    elif problems:
        first = f"# GPU check{' --dry-run' if dry_run else ''}: FAILED: " + "; ".join(first_problems[:3]) \
            + (f" (+{len(problems) - min(3, len(first_problems))} more below)" if len(problems) > 3 or
               len(first_problems) < len(problems) else "")
        code = 1
    elif dry_run:
        first = "# GPU check --dry-run (no GPU): ok; CUDA stages skipped: no GPU; this is not a GPU verdict"
        code = 0
    else:
        first = "# GPU check: ok"
        code = 0
    text = [first, "", header_line(env, started, budget), ""]
    text += ["| stage | verdict | key numbers | log |", "| --- | --- | --- | --- |"] + rows + [""]
    if problems:
        text += ["## Problems", ""] + [f"- {p}" for p in problems] + [""]
    text += sections
    if ptxas_md is not None and ptxas_md.exists() and ptxas_md.stat().st_size:
        text.append(ptxas_section(ptxas_md.read_text(), env.get("arch", "90")))
    return code, "\n".join(text).rstrip() + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--stage", action="append", default=[], help="name|state|rc|seconds|limit|note")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--final", action="store_true", help="the last call: the verdict, not 'incomplete'")
    parser.add_argument("--started", type=float, default=None, help="epoch seconds the check started")
    parser.add_argument("--budget", type=float, default=480.0)
    parser.add_argument("--ptxas-md", type=Path, default=None, help="a ptxas report table to quote, if present")
    args = parser.parse_args(argv)
    stages = [Stage.parse(s) for s in args.stage]
    code, text = summarize(args.out, stages, dry_run=args.dry_run, final=args.final, started=args.started,
                           budget=args.budget, ptxas_md=args.ptxas_md)
    (args.out / "summary.md").write_text(text)
    print(text.splitlines()[0])
    return code


if __name__ == "__main__":
    sys.exit(main())
