"""``python -m bench.perf``: the speed benchmarks -> ``docs/performance.md``.

    python -m bench.perf                          # every suite: training (sections a-d), then report
    python -m bench.perf --only a,b               # training sections only (bench.perf.training's --only)
    python -m bench.perf --only report [options]  # the report at the papers' sizes (bench.perf.report_scale)
    python -m bench.perf --only c,report          # training section c, then the report suite
    python -m bench.perf --suite report --help    # a suite's own options
    python -m bench.perf --suite gpu              # the GPU measurements (bench.perf.gpu_suite; not in "all")

``--only`` takes training's section names and suite names together; ``--suite`` picks whole
suites (``training``, ``report``, ``gpu``, ``all`` = training + report) and passes the remaining
options to that suite. Each suite rewrites only its own sections of ``docs/performance.md``.
"""

from __future__ import annotations

import argparse
import sys

#: suite -> module whose ``main(argv)`` runs it; "all" runs DEFAULT (the GPU suite needs a GPU: asked for by name)
SUITES = {"training": "bench.perf.training", "report": "bench.perf.report_scale", "gpu": "bench.perf.gpu_suite"}
DEFAULT = ("training", "report")


def _run(suite: str, argv: list[str]) -> int:
    # each suite imported only when it runs (the GPU suite's imports are heavy)
    if suite == "training":
        from bench.perf import training as module
    elif suite == "report":
        from bench.perf import report_scale as module
    else:
        from bench.perf import gpu_suite as module
    return module.main(argv) or 0


def _split_only(rest: list[str]) -> tuple[list[str], set[str]]:
    """Take suite names out of every ``--only`` value of ``rest``: (the options left, suites named)."""
    out, suites, i = [], set(), 0
    while i < len(rest):
        arg = rest[i]
        if arg == "--only" and i + 1 < len(rest):
            value, i = rest[i + 1], i + 2
        elif arg.startswith("--only="):
            value, i = arg.split("=", 1)[1], i + 1
        else:
            out.append(arg)
            i += 1
            continue
        items = [v.strip() for v in value.split(",") if v.strip()]
        suites |= {v for v in items if v in SUITES}
        sections = [v for v in items if v not in SUITES]
        if sections:
            out += ["--only", ",".join(sections)]
            suites.add("training")
    return out, suites


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m bench.perf", add_help=False)
    parser.add_argument("--suite", choices=(*SUITES, "all"), default=None)
    args, rest = parser.parse_known_args(argv)
    rest, named = _split_only(rest)
    suites = set(DEFAULT) if args.suite == "all" else {args.suite} if args.suite else named or set(DEFAULT)
    if len(suites) == 1:
        return _run(next(iter(suites)), rest)
    status = 0
    for suite in SUITES:  # in a fixed order; options given go to the training suite (section letters)
        if suite in suites:
            status = _run(suite, rest if suite == "training" else []) or status
    return status


if __name__ == "__main__":
    sys.exit(main())
