import se_inject, torch, timm
from torch import nn
from se_inject.layers.attention import is_attention
from se_inject.models import build_model, resolve_model
def strip_half(name):
    model = build_model(resolve_model(f"timm:{name}"), device="meta")
    owned = [p for p, m in model.named_modules() if is_attention(m) and p.endswith(".se")]
    for p in owned[1::2]:
        model.set_submodule(p, nn.Identity())
    return model, owned[1::2]
for name in ["mobilenetv3_rw", "fbnetv3_b"]:
    try:
        ref = build_model(resolve_model(f"timm:{name}"), device="meta")
        stripped, paths = strip_half(name)
        out, rep = se_inject.inject(stripped, device="meta", seed=0, fill=True, input_size=(3,224,224), include=[p.rsplit(".",1)[0] for p in paths])
        a={k:tuple(v.shape) for k,v in out.state_dict().items()}; b={k:tuple(v.shape) for k,v in ref.state_dict().items()}
        print(name, len(paths), a==b, sorted(set(a.items())^set(b.items()))[:3], [n for n in rep.notes if "own" in n][:1])
    except Exception as e:
        print(name, "ERR", type(e).__name__, str(e)[:200])
