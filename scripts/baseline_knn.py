"""The seed's first experiment: ResNet-50 features + weighted kNN on CIFAR-10.

A thin wrapper over hardprobe; the same as
    hardprobe run --model resnet50 --data cifar10 --heads knn --out runs/baseline_knn
Extra flags are passed through, e.g. --weights FILE --data-root DIR for offline use.
"""
import sys

from hardprobe.cli import main

if __name__ == "__main__":
    args = ["run", "--model", "resnet50", "--data", "cifar10", "--heads", "knn",
            "--out", "runs/baseline_knn"]
    raise SystemExit(main(args + sys.argv[1:]))
