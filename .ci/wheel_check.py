"""Run inside a venv where personakern is installed from a wheel or an sdist, from a folder
outside the checkout: the installed package is what runs, its compiled cpu backend is usable
(built as argv[1] says: "aot" or "jit"), and a steered + monitored forward of a tiny random
Llama on it equals the same forward on native. Exits non-zero on any failure."""
import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import torch
import transformers

import personakern

want = sys.argv[1]
site = Path(sysconfig.get_paths()["purelib"]).resolve()
where = Path(personakern.__file__).resolve()
assert site in where.parents, f"personakern imported from {where}, not from the install in {site}"

info = json.loads(subprocess.run(["personakern", "info"], check=True, capture_output=True, text=True).stdout)
cpu = info["cpu_backend"]
print("personakern info cpu_backend:", json.dumps(cpu))
assert cpu.get("usable") is True, f"cpu backend not usable: {cpu.get('reason')}"
assert cpu.get("build") == want, f"cpu backend built {cpu.get('build')!r}, expected {want!r} ({cpu.get('aot')})"
assert Path(cpu["library"]).resolve().is_file() and site in Path(cpu["sources"]).resolve().parents, cpu
if want == "aot":
    assert site in Path(cpu["library"]).resolve().parents, cpu

# hidden 44: not a multiple of any vector width, on purpose
config = transformers.LlamaConfig(vocab_size=96, hidden_size=44, intermediate_size=80, num_hidden_layers=3,
                                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                  tie_word_embeddings=False)
config._attn_implementation = "eager"
torch.manual_seed(0)
model = transformers.LlamaForCausalLM(config).eval()
with torch.no_grad():
    for name, p in model.named_parameters():
        if "norm" in name:
            p.add_(0.1 * torch.randn_like(p))  # random init leaves them at 1: a wrong norm could hide
vecs = torch.nn.functional.normalize(torch.randn(2, 3, 44), dim=-1) * 4
ids = torch.randint(3, 96, (2, 9))

results = {}
for backend in ("native", "cpu"):
    with personakern.patch(model, backend=backend) as pk, torch.no_grad():
        assert pk.backend == backend, pk.backend
        pk.steer(vecs[0], alpha=[2.5, -1.5], layers=[0, 2], name="a")
        pk.monitor({"a": vecs[0], "b": vecs[1]}, layers="all")
        logits = model(input_ids=ids).logits
        results[backend] = (logits, pk.readings.values.clone())
(l_n, r_n), (l_c, r_c) = results["native"], results["cpu"]
torch.testing.assert_close(l_c, l_n, rtol=1e-5, atol=1e-5)
torch.testing.assert_close(r_c, r_n, rtol=1e-5, atol=1e-5)
assert not torch.isnan(r_c).any() and r_c.abs().sum() > 0
print(f"steered + monitored forward, cpu ({want}) vs native: max |logits diff| "
      f"{(l_c - l_n).abs().max().item():.2e}, max |readings diff| {(r_c - r_n).abs().max().item():.2e}")
