"""Running generated programs: only ever in :class:`codetune.eval.sandbox.Sandbox`, and only once it is up.

:func:`open_sandbox` sets the sandbox up before anything is generated and refuses the run when it cannot be
set up, or when the confinement it reports leaves generated code the network or a writable filesystem: there
is no fallback that runs generated code outside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from codetune.errors import first_line
from codetune.eval.sandbox import Sandbox, SandboxLimits, SandboxUnavailable
from codetune.selfinstruct.settings import Execution

# Confinement the sandbox reports (SandboxReport fields) that self-instruct will not run without.
REQUIRED_CONFINEMENT = ("network_isolated", "filesystem_read_only")


@dataclass(frozen=True)
class Outcome:
    """One program's result, as recorded in the stage logs."""

    passed: bool
    result: str
    """``passed``, ``timed out`` or ``failed: <reason>`` (the sandbox's words)."""
    seconds: float | None
    """Wall time the sandbox measured, when it reports one."""


def open_sandbox(execution: Execution) -> Sandbox:
    """A sandbox that has shown it can confine a program here, or :class:`SandboxUnavailable`."""
    try:
        sandbox = Sandbox(SandboxLimits(timeout=execution.timeout, memory_mb=execution.memory_mb),
                          workers=execution.workers)  # fmt: skip
        report = sandbox.report  # the first use probes the machine: now, before any generation
    except Exception as err:
        raise SandboxUnavailable(
            f"the sandbox cannot be set up on this machine ({first_line(err)}); self-instruct runs generated code only "
            "inside it, so nothing was generated or run (see docs/evaluation.md for what the sandbox needs)"
        ) from err
    missing = [name for name in REQUIRED_CONFINEMENT if getattr(report, name, True) is False]
    if missing:
        raise SandboxUnavailable(
            f"the sandbox here does not confine generated code ({', '.join(missing)} is false: "
            f"{'; '.join(getattr(report, 'warnings', ()) or ())}); self-instruct will not run generated code "
            "without it, so nothing was generated or run"
        )
    return sandbox


def sandbox_report(sandbox: Sandbox) -> dict[str, Any]:
    report = sandbox.report
    return report.as_dict() if hasattr(report, "as_dict") else {"report": str(report)}


def run_programs(sandbox: Sandbox, programs: Sequence[str]) -> list[Outcome]:
    """Run programs in the sandbox (in parallel there); outcomes in input order."""
    results = sandbox.run_many(list(programs)) if programs else []
    return [Outcome(bool(r.passed), str(r.result), getattr(r, "seconds", None)) for r in results]
