"""What a card and a benchmark say of the CPU: its cores, model name and the extensions that decide speed."""
import os

from vision.runtime import cpu_description, cpu_flags

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14
flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni avx512_bf16 sha_ni
"""


def test_the_description_names_the_model_and_the_speed_deciding_extensions(tmp_path):
    (tmp_path / "cpuinfo").write_text(CPUINFO)

    assert cpu_description(str(tmp_path / "cpuinfo")) == (
        f"{os.cpu_count()} cores, AMD EPYC 9R14, avx2+avx512f+avx512_vnni+avx512_bf16")


def test_a_cpu_without_avx2_says_so(tmp_path):
    (tmp_path / "cpuinfo").write_text("model name\t: Old CPU\nflags\t\t: fpu sse2\n")

    assert cpu_description(str(tmp_path / "cpuinfo")) == f"{os.cpu_count()} cores, Old CPU, no AVX2"


def test_flags_are_the_first_cpus_flag_set(tmp_path):
    (tmp_path / "cpuinfo").write_text(CPUINFO)

    assert cpu_flags(str(tmp_path / "cpuinfo")) == {
        "fpu", "sse2", "avx2", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "sha_ni"}


def test_an_unreadable_cpuinfo_has_no_flags(tmp_path):
    assert cpu_flags(str(tmp_path / "missing")) == set()
