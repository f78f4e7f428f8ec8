"""Body skeletons (hands and face as options): OpenPose from controlnet-aux.

The json records each person's 18 body keypoints (x, y in [0, 1], null when unseen).
A picture with nobody in it gives a black map; `keep_empty: false` drops such
samples instead (counted as `no_person` in the shard's stats either way)."""

from __future__ import annotations

import numpy as np

from ..transform.decode import Rejected
from .base import register
from .detector import DetectorAnnotator, fit


@register
class OpenPose(DetectorAnnotator):
    name = "openpose"
    mode = "RGB"
    files = ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth")
    # "licensed by CMU for non-commercial use only" (controlnet_aux/open_pose/__init__.py; Hzzone/pytorch-openpose#30)
    weights_licence = ("CMU OpenPose academic licence, non-commercial "
                       "(https://github.com/CMU-Perceptual-Computing-Lab/openpose/blob/master/LICENSE)")
    weights_source = "https://huggingface.co/lllyasviel/Annotators/blob/main/body_pose_model.pth"
    permissive_alternative = "dwpose"
    batch_size = 16
    cpu_batch = None  # body net at 184 px: batch 8 ran at 0.94x on a 2-core CPU
    #: the body network is batched (and cast); hands and face run per person inside controlnet-aux, in fp32
    net_path = "body_estimation.model"

    def __init__(self, hands: bool = False, face: bool = False, keep_empty: bool = True, **common):
        super().__init__(hands=hands, face=face, keep_empty=keep_empty, **common)
        self.hands, self.face, self.keep_empty = hands, face, keep_empty

    def load(self, folder):
        from controlnet_aux import OpenposeDetector

        return OpenposeDetector.from_pretrained(str(folder))

    def prepare(self, image):
        """controlnet-aux's Body.__call__ input: BGR at 0.5 x 368 px tall, padded to a multiple of 8 with 128."""
        import torch
        from controlnet_aux.open_pose import util
        from controlnet_aux.util import resize_image

        bgr = resize_image(np.ascontiguousarray(image), self.detect_resolution)[:, :, ::-1].copy()
        scale = 0.5 * 368 / bgr.shape[0]
        padded, _ = util.padRightDownCorner(util.smart_resize_k(bgr, fx=scale, fy=scale), 8, 128)
        batch = np.transpose(np.float32(padded[:, :, :, np.newaxis]), (3, 2, 0, 1)) / 256 - 0.5
        return torch.from_numpy(np.ascontiguousarray(batch)).float()

    def single(self, image, rng):
        from controlnet_aux.open_pose import draw_poses
        from controlnet_aux.util import resize_image

        self.setup()
        small = resize_image(np.ascontiguousarray(image), self.detect_resolution)
        poses = self.model.detect_poses(small, self.hands, self.face)
        if not poses and not self.keep_empty:
            raise Rejected("no_person", "openpose found no person (keep_empty is false)")
        canvas = draw_poses(poses, small.shape[0], small.shape[1], draw_body=True, draw_hand=self.hands,
                            draw_face=self.face)
        keypoints = [[[round(k.x, 4), round(k.y, 4)] if k is not None else None for k in pose.body.keypoints]
                     for pose in poses]  # normalised body keypoints: what eval compares against
        return fit(canvas, image, self.mode), {"persons": len(poses), "keypoints": keypoints, "_empty": not poses}
