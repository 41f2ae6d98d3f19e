"""bench.gpu keeps working without a GPU: the tiny backbone at a tiny size on the CPU."""

from __future__ import annotations

from bench import gpu


def test_gpu_bench_runs_on_cpu_at_a_tiny_size(capsys) -> None:
    code = gpu.main(["--backbone", "tiny-v2", "--sizes", "32", "--dtypes", "fp32", "--variants", "eager",
                     "channels_last", "--repeats", "1", "--warmup", "0", "--steps", "2", "--device", "cpu"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    rows = [line for line in out.splitlines() if line.startswith("| 32²")]
    assert len(rows) == 2
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    one, many, gflop = float(cells[3]), float(cells[4]), float(cells[6])
    assert one > 0 and many > 0  # timings only: which is faster depends on the machine's load (see the next test)
    assert gflop > 0


def test_multistep_calls_the_unet_once_per_step() -> None:
    import torch

    student = gpu.build_student("tiny-v2", torch.device("cpu"), torch.float32, "eager")
    calls = []
    student.unet.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        gpu.multistep(student, torch.zeros(1, 3, 16, 16), 3)
    assert len(calls) == 3
