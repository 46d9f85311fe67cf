"""Verifiable rewards (PAPER.md section 6), safe against whatever a policy under RL produces.

Modules (import the one you need; nothing heavy is imported here):

- `math`: final-answer extraction and math-verify equivalence, guarded and hard-time-limited.
- `code`: `run_tests` / `run_tests_batch`, verdicts per test case, on top of
- `sandbox`: one isolated execution (namespaces, allow-listed root, system-call filter, limits,
  output caps), using
- `protections`: which protections this machine allows, probed once (`SandboxError`),
- `fsview`: the program's root, built from an allow-list of host paths,
- `seccomp_filter`: the system-call filter (libseccomp),
- `limits`: rlimits, a cgroup v2 group per run, the process tree's memory,
- `isolation`: the Linux primitives (ctypes unshare/mount/pivot_root, uid leases).
- `testgen`: CYaRon test generation with the 50 / 10 / 7-of-10 / 9-of-10 rules.
- `judge`: chain-of-thought reward model (prompt, verdict parser, vLLM and HTTP clients).
- `registry`: name -> reward function, weighted combination, metrics (`RewardManager`).
- `pool`: the process pool with per-task CPU and wall-clock limits that math and code share.
"""
