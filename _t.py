import time, torch
from torchvision.models import get_model
import se_inject
t=time.time()
_, r = se_inject.inject("torchvision:ssd300_vgg16", device="meta", seed=0)
print("meta inject", time.time()-t)
base = get_model("ssd300_vgg16", weights=None, weights_backbone=None, score_thresh=0.0, detections_per_img=10, topk_candidates=20).eval()
t=time.time()
inj, rep = se_inject.inject(base, init="identity", seed=0)
print("real inject", time.time()-t)
imgs=[torch.rand(3,64,80), torch.rand(3,72,64)]
t=time.time()
with torch.no_grad():
    a=base(imgs); b=inj.eval()(imgs)
print("fwd", time.time()-t)
print(all(torch.equal(a[i][k], b[i][k]) for i in range(2) for k in a[i]), len(a[0]["boxes"]))
