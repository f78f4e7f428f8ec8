"""Random-weight checkpoints for the controlnet-aux detectors, written offline.

Each kind builds the very network class controlnet-aux uses (seeded, so the files are
deterministic) and saves it under the file name(s) and in the checkpoint layout that the
detector's `from_pretrained(folder)` reads. Random weights: they check plumbing (file
names, key layout, shapes, dtypes, torch.load(weights_only=True)), never output quality.
Nothing is downloaded: no hub, no pretrained backbones.

`python tests/annotator_weights.py` writes, loads and runs every kind once on a tiny image.
"""

from __future__ import annotations

from pathlib import Path

KINDS = ("hed", "pidinet", "mlsd", "lineart", "lineart_anime", "openpose", "midas", "normalbae")


def _networks(kind: str) -> dict:
    """{file name: (network, how its state_dict is wrapped into the checkpoint)} for one kind."""
    import functools
    import types

    import torch.nn as nn

    plain = lambda sd: sd  # noqa: E731
    if kind == "hed":
        from controlnet_aux.hed import ControlNetHED_Apache2
        return {"ControlNetHED.pth": (ControlNetHED_Apache2(), plain)}
    if kind == "pidinet":  # loader: ckpt['state_dict'] with 'module.' stripped, as in the DataParallel original
        from controlnet_aux.pidi.model import pidinet
        return {"table5_pidinet.pth": (pidinet(), lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}})}
    if kind == "mlsd":
        from controlnet_aux.mlsd.models.mbv2_mlsd_large import MobileV2_MLSD_Large
        return {"mlsd_large_512_fp32.pth": (MobileV2_MLSD_Large(), plain)}
    if kind == "lineart":
        from controlnet_aux.lineart import Generator
        return {name: (Generator(3, 1, 3), plain) for name in ("sk_model.pth", "sk_model2.pth")}
    if kind == "lineart_anime":
        from controlnet_aux.lineart_anime import UnetGenerator
        norm = functools.partial(nn.InstanceNorm2d, affine=False, track_running_stats=False)
        return {"netG.pth": (UnetGenerator(3, 1, 8, 64, norm_layer=norm, use_dropout=False), plain)}
    if kind == "openpose":  # util.transfer drops the first key component ('model0.conv1_1.weight' -> 'conv1_1.weight')
        from controlnet_aux.open_pose.face import FaceNet
        from controlnet_aux.open_pose.model import bodypose_model, handpose_model
        strip = lambda sd: {k.split(".", 1)[1]: v for k, v in sd.items()}  # noqa: E731
        return {"body_pose_model.pth": (bodypose_model(), strip), "hand_pose_model.pth": (handpose_model(), strip),
                "facenet.pth": (FaceNet(), plain)}
    if kind == "midas":  # path=None: no load; DPT passes use_pretrained=False to timm, so no backbone download
        from controlnet_aux.midas.midas.dpt_depth import DPTDepthModel
        net = DPTDepthModel(path=None, backbone="vitb_rn50_384", non_negative=True)
        return {"dpt_hybrid-midas-501f0c75.pt": (net, plain)}
    if kind == "normalbae":  # same args as NormalBaeDetector.from_pretrained; the encoder is built pretrained=False
        from controlnet_aux.normalbae.nets.NNET import NNET
        args = types.SimpleNamespace(mode="client", architecture="BN", pretrained="scannet",
                                     sampling_ratio=0.4, importance_ratio=0.7)
        return {"scannet.pt": (NNET(args), lambda sd: {"model": sd})}
    raise ValueError(f"unknown kind {kind!r}; choose from {', '.join(KINDS)}")


def write_random_weights(kind: str, folder) -> Path:
    """Write random weights for `kind` into `folder` so that the detector's from_pretrained(folder) loads them."""
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    for name, (net, wrap) in _networks(kind).items():
        torch.save(wrap(net.state_dict()), folder / name)
        del net  # one network in memory at a time; the big ones are hundreds of MB
    return folder


def load_detector(kind: str, folder):
    import controlnet_aux as ca

    cls = {"hed": ca.HEDdetector, "pidinet": ca.PidiNetDetector, "mlsd": ca.MLSDdetector,
           "lineart": ca.LineartDetector, "lineart_anime": ca.LineartAnimeDetector,
           "openpose": ca.OpenposeDetector, "midas": ca.MidasDetector, "normalbae": ca.NormalBaeDetector}[kind]
    return cls.from_pretrained(str(folder))


if __name__ == "__main__":
    import sys
    import tempfile
    import time

    import numpy as np
    import torch

    torch.set_num_threads(1)  # shared machine: keep CPU use modest
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    print(f"{'kind':<14} {'shape':<14} {'dtype':<6} {'MB':>6} {'write s':>8} {'run s':>6}")
    for kind in sys.argv[1:] or KINDS:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            write_random_weights(kind, tmp)
            t1 = time.perf_counter()
            mb = sum(p.stat().st_size for p in Path(tmp).iterdir()) / 2**20
            out = load_detector(kind, tmp)(image, detect_resolution=64, image_resolution=64, output_type="np")
            t2 = time.perf_counter()
        print(f"{kind:<14} {str(out.shape):<14} {str(out.dtype):<6} {mb:>6.0f} {t1 - t0:>8.1f} {t2 - t1:>6.1f}",
              flush=True)
