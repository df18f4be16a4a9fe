"""mediapipe's bundled models, offline and quiet: pose and hand landmarkers, face mesh, people segmentation.

The mediapipe wheel (extra `pose`) carries its models as .tflite files under `mediapipe/modules`. Its
single-person "solutions" use them directly; its multi-person Tasks API wants them as .task bundles
with input-normalisation metadata, which the wheel does not carry. `task_bundle` writes that metadata
(the value ranges the solutions' own graphs feed each model) into in-memory copies of the bundled files
and zips them as the Tasks API expects, so several people and hands are found without any download.

mediapipe's native code writes notices straight to the process's stderr (TensorFlow Lite's delegate
line, glog warnings); `quiet_native_logs` holds them back while it runs.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import re
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from ..errors import MissingDependencyError

# Routine notices of mediapipe's native code: glog info and warning lines, TensorFlow Lite's delegate line.
_NATIVE_NOTICE = re.compile(r"^([IW]\d{4} \d\d:\d\d:\d\d|INFO: |WARNING: All log messages before absl)")

# Value range each bundled model expects its input in, as (mean, std) of uint8 pixels (from the graphs
# of mediapipe's solutions): the pose detector takes [-1, 1], the other models [0, 1].
_INPUT_RANGE = {"pose_detection": (127.5, 127.5), "pose_landmark": (0.0, 255.0),
                "palm_detection": (0.0, 255.0), "hand_landmark": (0.0, 255.0)}  # fmt: skip
POSE_BUNDLE = {"pose_detector.tflite": "pose_detection/pose_detection.tflite",
               "pose_landmarks_detector.tflite": "pose_landmark/pose_landmark_full.tflite"}  # fmt: skip
HAND_BUNDLE = {"hand_detector.tflite": "palm_detection/palm_detection_full.tflite",
               "hand_landmarks_detector.tflite": "hand_landmark/hand_landmark_full.tflite"}  # fmt: skip


@contextlib.contextmanager
def quiet_native_logs():
    """Hold back what native code writes to stderr meanwhile; afterwards write out all but routine notices.

    stderr is one file for the whole process, so another thread's lines written meanwhile come out late
    (never lost).
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = [line for line in held.read().decode(errors="replace").splitlines() if not _NATIVE_NOTICE.match(line)]
            if kept:
                print("\n".join(kept), file=sys.stderr)


def import_mediapipe():
    """The mediapipe module, imported quietly; a one-line error naming the `pose` extra when it is missing."""
    os.environ.setdefault("GLOG_minloglevel", "2")
    try:
        with quiet_native_logs():
            import mediapipe
    except ImportError:
        raise MissingDependencyError("mediapipe", "pose") from None
    return mediapipe


def modules_folder() -> Path:
    return Path(import_mediapipe().__file__).parent / "modules"


@functools.lru_cache(maxsize=4)
def task_bundle(files: tuple[tuple[str, str], ...]) -> bytes:
    """A .task bundle (zip) of bundled models, each given the input-range metadata the Tasks API needs."""
    from mediapipe.tasks.python.metadata.metadata_writers import metadata_writer, writer_utils

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        for name, relative in files:
            model = (modules_folder() / relative).read_bytes()
            mean, std = _INPUT_RANGE[relative.split("/")[0]]
            writer = metadata_writer.MetadataWriter.create(model).add_image_input([mean], [std])
            for output in writer_utils.get_output_tensor_names(model):
                writer.add_feature_output(name=output)
            bundle.writestr(name, writer.populate()[0])
    return buffer.getvalue()


def pose_landmarker(max_people: int):
    """A Tasks PoseLandmarker over the bundled pose models that finds up to `max_people` people."""
    mediapipe = import_mediapipe()
    vision = mediapipe.tasks.vision
    options = vision.PoseLandmarkerOptions(
        base_options=mediapipe.tasks.BaseOptions(model_asset_buffer=task_bundle(tuple(POSE_BUNDLE.items()))),
        running_mode=vision.RunningMode.IMAGE,
        num_poses=max_people,
    )
    return vision.PoseLandmarker.create_from_options(options)


def hand_landmarker(max_hands: int = 2):
    """A Tasks HandLandmarker over the bundled palm detector and hand landmark model."""
    mediapipe = import_mediapipe()
    vision = mediapipe.tasks.vision
    options = vision.HandLandmarkerOptions(
        base_options=mediapipe.tasks.BaseOptions(model_asset_buffer=task_bundle(tuple(HAND_BUNDLE.items()))),
        running_mode=vision.RunningMode.IMAGE,
        num_hands=max_hands,
    )
    return vision.HandLandmarker.create_from_options(options)


def as_mediapipe_image(rgb: np.ndarray):
    """(h, w, 3) uint8 RGB -> mediapipe.Image."""
    mediapipe = import_mediapipe()
    return mediapipe.Image(image_format=mediapipe.ImageFormat.SRGB, data=np.ascontiguousarray(rgb))


def people_probability(rgb: np.ndarray) -> np.ndarray:
    """Per-pixel probability of belonging to a person, from the bundled selfie segmentation: (h, w) float32."""
    solutions = import_mediapipe().solutions
    with solutions.selfie_segmentation.SelfieSegmentation(model_selection=0) as model:
        found = model.process(np.ascontiguousarray(rgb))
    return np.asarray(found.segmentation_mask, dtype=np.float32)
