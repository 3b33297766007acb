"""`flashnumba demo` and `flashnumba step` run and report small errors."""

import re

from flashnumba.cli import main


def test_demo_prints_every_implementation_with_small_errors(capsys):
    assert main(["demo", "--N", "24", "--d", "12", "--causal"]) == 0
    out = capsys.readouterr().out
    rows = {m.group(1).strip(): [float(x) for x in m.group(2).split()[:5]]
            for m in re.finditer(r"^((?:mirror|kernel) .+?\)) +([-+.\de ]+)", out, re.M)}
    assert set(rows) == {"mirror fa1 (float64)", "mirror fa2 (float64)", "kernel fa1 (fp32)",
                         "kernel fa2 (fp32)", "kernel fa2_fast (fp32)", "kernel fa2_tc (bf16)"}, out
    for name, errs in rows.items():
        # bf16: P and the outputs rounded to 8 significant bits (unit 2^-8 = 3.9e-3)
        bound = 1e-12 if "float64" in name else 1e-2 if "bf16" in name else 1e-5
        assert len(errs) == 5 and max(errs) <= bound, (name, errs)
    assert "online softmax" in out and "float64 reference lse" in out
    api = {m.group(1): m.group(2).split()[:5]
           for m in re.finditer(r"^  (float32|float16|bfloat16) +(.+)$", out, re.M)}
    assert set(api) == {"float32", "float16", "bfloat16"}, out
    assert all(not cell.endswith("!") for cells in api.values() for cell in cells)   # all pass
    assert max(float(x) for x in api["float32"]) <= 1e-5
    assert all(float(x.rstrip("x")) <= 2 for x in api["bfloat16"][:1])
    assert "simulator" in out or "GPU" in out


def test_step_command_agrees(capsys):
    assert main(["step", "fa2_forward", "--Nq", "30", "--Nk", "50", "--d", "8",
                 "--Br", "16", "--Bc", "32"]) == 0
    out = capsys.readouterr().out
    assert "agree at every step" in out
