"""Generate test cases for code problems with CYaRon generators (PAPER.md section 6).

    python tools/gen_code_tests.py --input problems.jsonl --output code_rl.jsonl \
        [--num-cases 50] [--num-solutions 10] [--case-min-agree 7] [--problem-min-pass 9] \
        [--workers 8] [--time-limit-s 5]

Reads problem records (schema: `k15_megatron.rewards.testgen` module docstring), runs every
generator and ground-truth solution in the code sandbox, and writes the kept problems with
their tests as JSONL for the RL data loader. One summary line per problem goes to stderr.
Defaults come from `TestGenConfig` / `CodeRewardConfig`; the flags override them. An existing
--output file is refused unless --overwrite is given (it is then replaced atomically).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from k15_megatron.config.rewards import CodeRewardConfig, RewardsConfig, TestGenConfig
from k15_megatron.data.jsonl import read_jsonl
from k15_megatron.rewards.testgen import generate_jsonl


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="problems JSONL")
    parser.add_argument("--output", required=True, help="JSONL of kept problems with tests (a new file)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    defaults, code = TestGenConfig(), CodeRewardConfig()
    for field in dataclasses.fields(TestGenConfig):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=int,
                            default=getattr(defaults, field.name))
    parser.add_argument("--workers", type=int, default=code.num_workers,
                        help="sandbox worker processes")
    parser.add_argument("--time-limit-s", type=float, default=code.time_limit_s,
                        help="wall-clock limit per generator or solution run")
    parser.add_argument("--memory-mb", type=int, default=code.memory_mb)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    testgen = TestGenConfig(**{f.name: getattr(args, f.name)
                               for f in dataclasses.fields(TestGenConfig)})
    code = CodeRewardConfig(num_workers=args.workers, time_limit_s=args.time_limit_s,
                            memory_mb=args.memory_mb,
                            num_sandbox_uids=max(CodeRewardConfig().num_sandbox_uids,
                                                 args.workers))
    errors = RewardsConfig(code=code).validate() + testgen.validate(prefix="--testgen")
    if os.path.exists(args.output) and not args.overwrite:
        errors.append(f"--output {args.output}: exists; pass --overwrite to replace it, or choose another file")
    if errors:
        raise SystemExit("invalid options:\n  " + "\n  ".join(errors))
    problems = read_jsonl(args.input)
    reports = generate_jsonl(problems, args.output, testgen=testgen, code=code)
    for report in reports:
        status = "kept" if report.kept else f"dropped: {report.reason}"
        print(f"{report.problem_id}: {len(report.tests)}/{report.cases_generated} cases kept, "
              f"{report.solutions_passing}/{testgen.num_solutions} solutions pass; {status}",
              file=sys.stderr)
    kept = sum(r.kept for r in reports)
    print(f"{kept} of {len(reports)} problems kept", file=sys.stderr)
    print(f"gen_code_tests: wrote {kept} problems to {os.path.abspath(args.output)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
