"""The entry points' re-execution with huge pages for XLA's buffers (mspec/kernels/host_malloc.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mspec.kernels import host_malloc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLIBC = ("glibc", "2.36")


def test_adds_the_tunable_and_marker():
    env = host_malloc.tuned_environment({"PATH": "/bin"}, libc=GLIBC, thp="madvise")
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    assert env[host_malloc.REEXEC_MARKER] == "1"
    assert env["PATH"] == "/bin"


def test_appends_to_existing_tunables():
    env = host_malloc.tuned_environment(
        {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, libc=GLIBC, thp="always"
    )
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


@pytest.mark.parametrize(
    "environ, libc, thp",
    [
        ({"MSPEC_MALLOC_TUNING": "0"}, GLIBC, "madvise"),  # opted out
        ({"MSPEC_MALLOC_TUNING": "off"}, GLIBC, "madvise"),
        ({"MSPEC_MALLOC_REEXEC": "1"}, GLIBC, "madvise"),  # already re-executed: no loop
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, GLIBC, "madvise"),  # user's choice wins
        ({}, ("glibc", "2.34"), "madvise"),  # tunable does not exist yet
        ({}, ("", ""), "madvise"),  # musl or unknown C library
        ({}, GLIBC, "never"),  # kernel THP off: the tunable has no effect
        ({}, GLIBC, None),  # no THP support at all
    ],
)
def test_leaves_the_environment_alone(environ, libc, thp):
    assert host_malloc.tuned_environment(environ, libc=libc, thp=thp) is None


def test_glibc_version_parsing():
    assert host_malloc.glibc_supports_hugetlb(("glibc", "2.35"))
    assert host_malloc.glibc_supports_hugetlb(("glibc", "3.0"))
    assert not host_malloc.glibc_supports_hugetlb(("glibc", "2.9"))
    assert not host_malloc.glibc_supports_hugetlb(("glibc", "garbage"))


def test_thp_mode_reads_the_bracketed_word(tmp_path):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert host_malloc.thp_mode(str(f)) == "madvise"
    assert host_malloc.thp_mode(str(tmp_path / "missing")) is None


# A child that re-executes itself, then reports its tunables, its argv and its page faults for
# touching 256 MiB from glibc's malloc, as XLA's buffers come (numpy is no probe: it asks for huge
# pages itself).
_CHILD = r"""
import ctypes, os, resource, sys
from mspec.kernels import host_malloc
host_malloc.reexec_with_hugepages()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
size = 256 * 1024 * 1024
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
ctypes.memset(libc.malloc(size), 1, size)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(os.environ.get("GLIBC_TUNABLES", ""), "|", " ".join(sys.argv[1:]), "|", faults)
"""


def _run_child(extra_env: dict) -> tuple[str, str, int]:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "MSPEC_MALLOC_REEXEC", "MSPEC_MALLOC_TUNING")}
    env.update(extra_env)
    env["PYTHONPATH"] = REPO
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, "--flag=1", "two words"],
        env=env, capture_output=True, text=True, timeout=120, check=True,
    ).stdout.strip().splitlines()[-1]
    tunables, args, faults = (part.strip() for part in out.split("|"))
    return tunables, args, int(faults)


@pytest.mark.skipif(
    host_malloc.tuned_environment({}) is None,
    reason="glibc < 2.35 or transparent huge pages off: the re-execution does not apply here",
)
def test_reexec_keeps_the_command_line_and_cuts_page_faults():
    tunables, args, faults = _run_child({})
    assert tunables == "glibc.malloc.hugetlb=1"
    assert args == "--flag=1 two words"
    off_tunables, off_args, off_faults = _run_child({"MSPEC_MALLOC_TUNING": "0"})
    assert off_tunables == "" and off_args == args
    # 256 MiB in 4 KiB pages is 65,536 faults; in 2 MiB pages 128. Allow for pages the kernel
    # could not make huge.
    assert off_faults > 60_000
    assert faults < off_faults / 8


def test_untuned_hint_only_where_the_entry_points_would_have_restarted():
    untuned = {"PATH": "/bin"}
    hint = host_malloc.untuned_hint(untuned, libc=GLIBC, thp="madvise")
    assert hint and host_malloc.HUGEPAGE_TUNABLE in hint and host_malloc.OPT_OUT_VAR in hint
    # Already tuned, opted out, re-executed, or the setting would do nothing: no advice.
    assert host_malloc.untuned_hint(
        {"GLIBC_TUNABLES": host_malloc.HUGEPAGE_TUNABLE}, libc=GLIBC, thp="madvise"
    ) is None
    assert host_malloc.untuned_hint({host_malloc.OPT_OUT_VAR: "0"}, libc=GLIBC, thp="madvise") is None
    assert host_malloc.untuned_hint({host_malloc.REEXEC_MARKER: "1"}, libc=GLIBC, thp="madvise") is None
    assert host_malloc.untuned_hint(untuned, libc=GLIBC, thp="never") is None
    assert host_malloc.untuned_hint(untuned, libc=("glibc", "2.31"), thp="madvise") is None


def test_warn_if_untuned_logs_once_and_only_for_cpu(monkeypatch, caplog):
    monkeypatch.setattr(host_malloc, "_warned", False)
    monkeypatch.setattr(host_malloc, "untuned_hint", lambda environ: "set the tunable")
    with caplog.at_level("WARNING", logger="mspec"):
        host_malloc.warn_if_untuned("gpu")
        assert not caplog.records
        host_malloc.warn_if_untuned("cpu")
        host_malloc.warn_if_untuned("cpu")
    assert [r.getMessage() for r in caplog.records] == ["set the tunable"]


def test_no_restart_for_an_accelerator_run(tmp_path):
    """The setting is about XLA:CPU's buffers: a GPU/TPU run is not restarted for it."""
    cpu_only = {"PATH": "/bin"}
    assert host_malloc.tuned_environment(cpu_only, libc=GLIBC, thp="madvise", dev=str(tmp_path))
    (tmp_path / "nvidia0").write_text("")
    assert host_malloc.accelerator_expected(cpu_only, dev=str(tmp_path))
    assert host_malloc.tuned_environment(cpu_only, libc=GLIBC, thp="madvise", dev=str(tmp_path)) is None
    # JAX_PLATFORMS decides when set: cpu first runs XLA:CPU even on a GPU machine.
    forced_cpu = {**cpu_only, "JAX_PLATFORMS": "cpu"}
    assert host_malloc.tuned_environment(forced_cpu, libc=GLIBC, thp="madvise", dev=str(tmp_path))
    assert host_malloc.accelerator_expected({"JAX_PLATFORMS": "tpu,cpu"}, dev=str(tmp_path / "none"))
