"""The GPU preflight both backends run on every host before a GPU config (float16 / NHWC / DALI mixed decode)
starts: GPUs >= the host's ranks, a working driver, and a Horovod built with NCCL in the ranks' interpreter."""
from __future__ import annotations

import shlex

GPU_PROBE_TIMEOUT_S = 60


def gpu_probe_script(python: str, timeout_s: int = GPU_PROBE_TIMEOUT_S) -> str:
    """POSIX sh: `gpus N` (GPUs `nvidia-smi -L` lists) or `gpus_error WHY` (no driver), then `nccl yes|no` or
    `nccl_error WHY` (whether Horovod, as imported by `python`, the ranks' interpreter, was built with NCCL)."""
    q = shlex.quote
    nccl = 'import horovod.mxnet as hvd; print("nccl", "yes" if hvd.nccl_built() else "no")'
    return "; ".join([
        "if command -v nvidia-smi >/dev/null 2>&1; then "
        f"gpu_out=$(timeout {timeout_s} nvidia-smi -L 2>&1); gpu_rc=$?; "
        'if [ "$gpu_rc" -eq 0 ]; then echo gpus $(printf "%s\\n" "$gpu_out" | grep -c "^GPU [0-9][0-9]*:"); '
        'else echo gpus_error "nvidia-smi -L exit $gpu_rc: $(printf "%s\\n" "$gpu_out" | grep . | tail -n 1)"; fi; '
        "else echo gpus_error nvidia-smi not found; fi",
        f"nccl_out=$({q(python)} -c {q(nccl)} 2>&1); "
        'if printf "%s\\n" "$nccl_out" | grep -q "^nccl "; then printf "%s\\n" "$nccl_out" | grep "^nccl " | tail -n 1; '
        'else echo nccl_error "$(printf "%s\\n" "$nccl_out" | grep . | tail -n 1)"; fi',
    ])


def gpu_problems(facts: dict[str, str], slots: int, python: str) -> list[str]:
    """What a host's GPU probe output (gpu_probe_script) says is wrong for `slots` ranks on it."""
    problems = []
    if "gpus_error" in facts:
        problems.append(f"no working NVIDIA driver ({facts['gpus_error'][:200]})")
    else:
        try:
            gpus = int(facts.get("gpus", "0"))
        except ValueError:
            gpus = 0
        if gpus < slots:
            problems.append(f"{gpus} GPU(s) for {slots} slot(s) (nvidia-smi -L)")
    if facts.get("nccl") == "no":
        problems.append(f"Horovod in {python} is built without NCCL (hvd.nccl_built() is false; build it with "
                        "HOROVOD_GPU_OPERATIONS=NCCL: MXNET_BUILD=gpu make install, or train in the NGC-based image)")
    elif facts.get("nccl") != "yes":
        problems.append(f"cannot check NCCL: {python} -c 'import horovod.mxnet' failed "
                        f"({facts.get('nccl_error', 'no output')[:200]})")
    return problems
