"""The benchmark scripts' pure-Python parts (the scripts themselves need a GPU)."""

from __future__ import annotations

import importlib.util
import sys
from collections import Counter
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def load_script(name: str):
    # scripts/ on the path, as when a script runs (they import each other's helpers).
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before it runs, as an import would (dataclasses look it up)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("n", range(1, 9))
def test_bench_module_orders_balance_neighbours(n):
    # Every layer right after every other equally often and in every place equally often, each row
    # a permutation: the module benchmark's rounds must not favour a layer by its neighbour.
    rows = load_script("bench_module").williams_orders(n)
    assert len(rows) == (2 * n if n % 2 else n)
    assert all(sorted(row) == list(range(n)) for row in rows)
    after = Counter((row[j], row[j + 1]) for row in rows for j in range(n - 1))
    assert len(after) == n * (n - 1) and len(set(after.values())) <= 1
    place = Counter((v, j) for row in rows for j, v in enumerate(row))
    assert len(place) == n * n and len(set(place.values())) == 1


def _ncu_csv(kernels):
    """ncu --csv --print-units base output: a row per kernel and metric, as ncu prints it."""
    head = ('"ID","Process ID","Kernel Name","Grid Size","Metric Name","Metric Unit",'
            '"Metric Value"')
    rows = ["==PROF== Connected to process 1", head]
    for i, (name, ns, instr) in enumerate(kernels):
        rows.append(f'"{i}","1","{name}","(1, 1, 1)","gpu__time_duration.sum","ns","{ns:,}"')
        rows.append(f'"{i}","1","{name}","(1, 1, 1)","smsp__inst_executed.sum","inst","{instr}"')
    return "\n".join(rows)


STEP = [("void int4train::cuda_detail::<unnamed>::pass_kernel<int4train::BFloat16, (int)256>"
         "(int4train::cuda_detail::<unnamed>::Params)", 30_000, 1_000_000),
        ("nvjet_sm90_qqtst_128x128_TNT", 60_000, 5_000),
        ("void int4train::sum_partials_kernel<256>(const double *, int, double, float *)",
         10_000, 2_000)]


def test_kernel_breakdown_table_of_the_measured_step():
    kb = load_script("kernel_breakdown")
    warmup = [(n, 2 * ns, i) for n, ns, i in STEP]  # the first step's times must not count
    step = kb.measured_step(kb.parse_ncu_csv(_ncu_csv(warmup + STEP)))
    assert [kb.short_name(k.name) for k in step] == [
        "pass_kernel<BFloat16, 256>", "nvjet_sm90_qqtst_128x128_TNT", "sum_partials_kernel<256>"]
    assert [k.is_product for k in step] == [False, True, False]
    table = kb.format_table({"8x16x32": step}, instructions=True)
    assert "| `pass_kernel<BFloat16, 256>` | 30.0 (1.00 M) |" in table
    assert "| all (µs) | 100 |" in table
    assert "| the products | 60 (60%) |" in table
    assert "| everything else | 40 (40%) |" in table


def test_kernel_breakdown_rejects_what_is_not_two_steps(tmp_path):
    kb = load_script("kernel_breakdown")
    with pytest.raises(ValueError, match="two identical steps"):
        kb.measured_step(kb.parse_ncu_csv(_ncu_csv(STEP)))
    with pytest.raises(ValueError, match="different kernels"):
        kb.measured_step(kb.parse_ncu_csv(_ncu_csv(STEP + STEP[::-1])))
    with pytest.raises(ValueError, match="no CSV rows"):
        kb.parse_ncu_csv("==PROF== nothing profiled")
    with pytest.raises(ValueError, match="TOKENSxINxOUT"):
        kb.parse_shape("8192x4096")
    csv_file = tmp_path / "step.csv"
    csv_file.write_text(_ncu_csv(STEP + STEP))
    with pytest.raises(SystemExit, match="SHAPE=FILE"):
        kb.main(["--from-csv", str(csv_file)])


def test_profile_step_rejects_a_negative_kernel_count(monkeypatch, capsys):
    ps = load_script("profile_step")
    monkeypatch.setattr(sys, "argv", ["profile_step.py", "--kernels", "-1"])
    with pytest.raises(SystemExit) as e:
        ps.main()
    assert e.value.code == 2
    assert "--kernels must be 0 or more, got -1" in capsys.readouterr().err


@pytest.mark.parametrize("recipes", ["fp", "int8,hq_bs", ""])
def test_profile_step_pieces_reject_a_first_recipe_without_steps(monkeypatch, capsys, recipes):
    ps = load_script("profile_step")
    monkeypatch.setattr(sys, "argv", ["profile_step.py", "--pieces", "--recipes", recipes])
    with pytest.raises(SystemExit) as e:
        ps.main()
    assert e.value.code == 2
    assert "--pieces times the first recipe's LSQ ops" in capsys.readouterr().err


# A hand-written cuobjdump -sass excerpt: two kernels, a predicated instruction, a loop, the
# self-branch that pads the code.
_SASS = """
	code for sm_90a
		Function : _Z3fooPf
	.headerflags	@"EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                /* 0x00000a00ff017b82 */
                                                                         /* 0x000fe40000000800 */
        /*0010*/                   IMAD.WIDE.U32 R2, R3, 0x20, R4 ;      /* 0x0000002003027825 */
        /*0020*/               @!P1 LOP3.LUT R4, R4, UR14, R0, 0x96, !PT ;
        /*0030*/                   FFMA R5, R5, 1.52587890625e-05, R6 ;
        /*0040*/               @P0 BRA 0x10 ;
        /*0050*/                   EXIT ;
        /*0060*/                   BRA 0x60;
		Function : _Z3barv
        /*0000*/                   SHFL.BFLY PT, R50, R31, 0x1, 0x1f ;
        /*0010*/                   EXIT ;
"""


def test_sass_mix_parses_kernels_histograms_and_loops():
    sm = load_script("sass_mix")
    foo, bar = sm.parse_sass(_SASS)
    assert (foo.name, bar.name) == ("_Z3fooPf", "_Z3barv")
    assert [i.address for i in foo.instrs] == [0x0, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60]
    assert foo.instrs[2].predicate == "@!P1" and foo.instrs[2].opcode == "LOP3.LUT"
    assert foo.histogram() == Counter(
        {"LDC": 1, "IMAD": 1, "LOP3": 1, "FFMA": 1, "BRA": 2, "EXIT": 1})
    # The branch back from 0x40 to 0x10 is a loop; the padding's branch to itself is not.
    assert foo.loops() == [(0x10, 0x40)]
    assert foo.histogram(0x10, 0x41) == Counter({"IMAD": 1, "LOP3": 1, "FFMA": 1, "BRA": 1})
    assert bar.histogram() == Counter({"SHFL": 1, "EXIT": 1}) and bar.loops() == []
    assert sm.branch_target("0x2a20") == 0x2a20 and sm.branch_target("UR14, 0x2a20") == 0x2a20
    assert sm.branch_target("R4") is None


def test_sass_mix_rejects_bad_arguments(tmp_path):
    sm = load_script("sass_mix")
    with pytest.raises(SystemExit, match="input: no such file"):
        sm.main([str(tmp_path / "missing.cu")])
    (tmp_path / "k.cubin").write_bytes(b"")
    with pytest.raises(SystemExit, match="--top must be a positive integer, got 0"):
        sm.main([str(tmp_path / "k.cubin"), "--top", "0"])


def test_power_step_window_means_take_the_samples_inside_the_window():
    ps = load_script("power_step")
    samples = [(0.5, 100.0, 1980.0), (1.0, 600.0, 1500.0), (1.5, 700.0, 1400.0), (2.5, 50.0, 345.0)]
    assert ps.window_means(samples, 1.0, 2.0) == (650.0, 1450.0, 2)
    power, clock, n = ps.window_means(samples, 3.0, 4.0)
    assert n == 0 and power != power and clock != clock  # NaN: no poll in the window


@pytest.mark.parametrize("argv, message", [
    (["--seconds", "0"], "--seconds must be positive, got 0.0"),
    (["--seconds", "2", "--settle", "2"], "--settle must be in [0, --seconds), got 2.0"),
    (["--rounds", "0"], "--rounds must be at least 1, got 0"),
])
def test_power_step_rejects_bad_arguments(monkeypatch, capsys, argv, message):
    ps = load_script("power_step")
    monkeypatch.setattr(sys, "argv", ["power_step.py", *argv])
    with pytest.raises(SystemExit) as e:
        ps.main()
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_power_step_poller_reads_power_and_clock_and_falls_back(monkeypatch):
    # nvidia-smi's answer parsed as (W, MHz); a driver without power.draw.instant answers
    # "[N/A]" (or fails), and the poller then queries power.draw.
    ps = load_script("power_step")
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        field = cmd[3]
        if "power.draw.instant" in field:
            return ps.subprocess.CompletedProcess(cmd, 0, stdout="[N/A], 1980\n")
        return ps.subprocess.CompletedProcess(cmd, 0, stdout="693.12, 1485\n")

    monkeypatch.setattr(ps.subprocess, "run", fake_run)
    poller = ps.Poller("0", 0.05)
    assert poller.field == "power.draw"
    assert poller._query(poller.field) == (693.12, 1485.0)
    assert calls[0][:3] == ["nvidia-smi", "-i", "0"]

    def failing_run(cmd, **kwargs):
        raise ps.subprocess.CalledProcessError(9, cmd)

    monkeypatch.setattr(ps.subprocess, "run", failing_run)
    with pytest.raises(SystemExit, match="gave no power.draw reading"):
        ps.Poller("0", 0.05)
