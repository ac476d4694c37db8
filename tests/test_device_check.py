"""bench/device_check.py and bench/compile_check.py: the pieces that need neither a GPU nor a
compiler (CI runs both scripts for real: `make compile-check device-env-check` in .ci/run)."""

import json
import os
import tarfile

import pytest

from bench import compile_check, device_check, device_preflight


def test_transformers_pin_is_read_from_setup_py():
    low, high = device_check._pin("transformers")
    assert device_check._vtuple(low) < device_check._vtuple(high)


def test_preflight_reads_setup_py_and_names_what_is_unmet():
    reqs = device_preflight.install_requires()
    assert any(r.startswith("transformers>=") for r in reqs)
    assert any(r.startswith("torch") for r in reqs)
    bad = dict(device_preflight.unmet(["pytest>=999", "surely-no-such-package>=1", "pytest>=1",
                                       "surely-no-such-package; sys_platform == 'no-such-os'"]))
    assert bad == {"pytest>=999": f"{device_preflight.metadata.version('pytest')} installed",
                   "surely-no-such-package>=1": "not installed"}
    line = device_preflight.download_line(["transformers<5.25,>=5.17"])
    assert "--python-version 3.12" in line and line.endswith("-d .whl 'transformers<5.25,>=5.17'")


def test_summary_and_pack_leave_at_most_four_files(tmp_path):
    """The device tool returns at most 8 files: summary.md/.json, the log and one archive."""
    out = tmp_path / "out"
    (out / "bench" / "NVIDIA-H200").mkdir(parents=True)
    (out / "bench" / "NVIDIA-H200" / "bench_loss.json").write_text("{}")
    (out / "gpu_tests.xml").write_text("<x/>")
    (out / "device_check.log").write_text("log")
    summary = {"command": "c", "dry_run": True, "budget_s": 10, "seconds": 1.0,
               "stages": {"env": {"status": "ok", "seconds": 0.1, "facts": {"torch": "x|y"}}}}
    device_check._write_summary(str(out), summary)
    device_check._pack(str(out))
    assert sorted(os.listdir(out)) == ["device_check.log", "device_check.tar.gz", "summary.json", "summary.md"]
    with tarfile.open(out / "device_check.tar.gz") as tar:
        assert {"gpu_tests.xml", "bench/NVIDIA-H200/bench_loss.json"} <= set(tar.getnames())
    assert json.load(open(out / "summary.json"))["stages"]["env"]["status"] == "ok"
    assert "x/y" in (out / "summary.md").read_text()        # no stray table separators


PTXAS = """ptxas info    : Compiling entry function '_Z6kernelPf' for 'sm_90a'
ptxas info    : Function properties for _Z6kernelPf
    64 bytes stack frame, 60 bytes spill stores, 60 bytes spill loads
ptxas info    : Used 48 registers, used 1 barriers, 384 bytes smem, 380 bytes cmem[0]
"""
SASS = """
        /*0100*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0110*/                   LDG.E.64 R8, desc[UR4][R2.64+0x10] ;
        /*0120*/                   LDG.E.U16 R9, desc[UR4][R2.64+0x20] ;
        /*0130*/                   STG.E desc[UR4][R6.64], R0 ;
        /*0140*/                   STL [R1], R5 ;
"""


def test_compile_check_reads_ptxas_and_sass():
    (row,) = compile_check._ptxas_rows(PTXAS)
    assert (row["arch"], row["regs"], row["stack"], row["spill_bytes"], row["smem"]) == ("sm_90a", 48, 64, 60, 384)
    w = compile_check._sass_widths(SASS)
    assert (w["ld128"], w["ld64"], w["ld32"], w["st32"], w["stl"]) == (1, 1, 1, 1, 1)


def test_compile_check_budgets():
    ok = dict(kind="triton", kernel="_logprobs_fwd_kernel", variant="logprobs_fwd bf16 entropy=0", arch="sm_90a",
              regs=32, stack=0, stl=0, ld128=2)
    assert compile_check.problems([ok]) == []
    assert "no 128-bit" in compile_check.problems([dict(ok, ld128=0)])[0]
    assert "budget 0" in compile_check.problems([dict(ok, stack=16, stl=2)])[0]
    fp32_linear = dict(ok, kernel="_linear_fwd_kernel",
                       variant="linear_fwd fp32 H=1536 bias=1 entropy=1", stack=16, stl=2)
    assert compile_check.problems([fp32_linear]) == []       # within the fp32 fused-linear budget
    cuda = dict(kind="cuda", kernel="k", arch="sm_80", regs=64, stack=8, spill_bytes=4)
    assert "budget 0" in compile_check.problems([cuda])[0]
    failed = dict(kind="cuda", kernel="k", arch="sm_80", error="nvcc failed")
    assert "nvcc failed" in compile_check.problems([failed])[0]


def _alive(pid: int) -> bool:
    """pid exists and is not a zombie (an orphan may wait a moment for init to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_time_plan_fits_six_minutes():
    assert sum(est for _, est in device_check.PLAN.values()) <= 360 < device_check.BUDGET_S <= 480
    assert all(limit >= est for limit, est in device_check.PLAN.values())


def test_stage_timeout_and_exit_kill_the_whole_process_group(tmp_path):
    """A stage's grandchild (bench_step's provider process) must not outlive the stage: on a GPU it
    would keep its memory through every later stage."""
    for timeout, tail, want_rc in ((1.0, "wait", 124), (60.0, "exit 0", 0)):
        pidfile = tmp_path / "pid"
        cmd = ["bash", "-c", f"sleep 120 & echo $! > {pidfile}; {tail}"]
        rc, seconds = device_check._run(cmd, str(tmp_path / "stage.log"), timeout)
        assert rc == want_rc and seconds < 30
        assert not _alive(int(pidfile.read_text()))


def test_every_stage_has_a_command_and_only_rejects_unknown_stages(tmp_path):
    from types import SimpleNamespace

    for dry in (True, False):
        for name in device_check.STAGES[1:]:                        # env runs in the driver itself
            cmd = device_check._command(SimpleNamespace(dry_run=dry), str(tmp_path), name)
            assert cmd[0] == device_check.sys.executable and "-m" in cmd
    with pytest.raises(SystemExit):
        device_check.main(["--dry-run", "--only", "no-such-stage", "--out", str(tmp_path)])


def test_only_rerun_keeps_the_other_stages_rows(tmp_path):
    first = {"command": "c", "dry_run": True, "budget_s": 9, "stages": {
        "ceilings": {"status": "ok", "seconds": 1.0, "facts": {"copy_GBps": 3.0}}}}
    device_check._write_summary(str(tmp_path), first)
    assert device_check.main(["--dry-run", "--only", "env", "--out", str(tmp_path)]) == 0
    stages = json.load(open(tmp_path / "summary.json"))["stages"]
    assert set(stages) == {"ceilings", "env"} and stages["ceilings"]["facts"]["copy_GBps"] == 3.0
