"""``npcam-export keras MODEL.keras``: a Keras classifier (Keras 3, or Keras 2 through tf-keras) as a bundle.

The model is loaded with Keras (``.keras``; ``.h5`` by Keras 3, else by tf-keras), traced as a TensorFlow
function in inference mode and converted by tf2onnx; the ONNX route splits, writes and checks it against
the Keras model's own ``predict``. Needs the ``keras`` extra.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .converted import OPSET, check_file, export_converted, first_line, import_tensorflow, quiet
from .errors import ExportError

if TYPE_CHECKING:
    from .quantize import Int8

EXTRA = "keras"


def run_keras(
    model: Path,
    out: Path | None = None,
    labels: Path | None = None,
    mean=None,
    std=None,
    input_size=None,
    int8: Path | Int8 | None = None,
) -> Path:
    """Export a ``.keras`` or ``.h5`` image classifier; returns the bundle directory."""
    check_file(model, (".keras", ".h5", ".hdf5"), "Keras model")
    tf, tf2onnx = import_tensorflow(EXTRA)
    net, keras_version = _load(model)
    if len(net.inputs) != 1 or len(net.outputs) != 1:
        raise ExportError(
            f"{model}: the model has {len(net.inputs)} inputs and {len(net.outputs)} outputs; "
            "npcam needs one image input and one output (class scores)"
        )
    shape = tuple(net.inputs[0].shape)
    if len(shape) != 4:
        raise ExportError(f"{model}: the input has shape {list(shape)}; npcam needs an image [N,H,W,C] or [N,C,H,W]")
    signature = [tf.TensorSpec(shape, tf.float32, name="image")]
    forward = tf.function(lambda x: net(x, training=False), input_signature=signature)
    try:
        with quiet():
            converted, _ = tf2onnx.convert.from_function(forward, input_signature=signature, opset=OPSET)
    except Exception as e:  # tf2onnx raises many types for ops it cannot map
        raise ExportError(f"{model}: tf2onnx cannot convert it ({first_line(e)}); nothing was written") from None

    def reference(x: np.ndarray) -> np.ndarray:
        with quiet():
            return np.asarray(net.predict(x.astype(np.float32), batch_size=shape[0] or len(x), verbose=0))

    versions = {"tensorflow": tf.__version__, "tf2onnx": tf2onnx.__version__, "keras": keras_version}
    return export_converted(model, "keras", converted, reference, versions, out, labels, mean, std, input_size, int8)


def _load(model: Path):
    """The model and the Keras version that loaded it: Keras 3 first, then tf-keras (a file Keras 2 wrote)."""
    import zipfile

    try:
        import keras
    except ImportError as e:
        raise ExportError(f"the keras route needs Keras ({e}): pip install 'npcam[{EXTRA}]'") from None
    if keras.backend.backend() != "tensorflow":  # KERAS_BACKEND was set by the user before we could
        raise ExportError(f"KERAS_BACKEND is {keras.backend.backend()!r}: tf2onnx converts TensorFlow; unset it")

    if model.suffix.lower() == ".keras" and not zipfile.is_zipfile(model):
        raise ExportError(f"{model}: not a .keras file (Keras writes a zip archive)")
    try:
        with quiet():
            return keras.saving.load_model(str(model), compile=False), f"keras {keras.__version__}"
    except Exception as e:  # Keras raises many types for files it cannot read
        first = e
    try:
        import tf_keras
    except ImportError:
        tf_keras = None
    if tf_keras is not None:
        try:
            with quiet():
                return tf_keras.models.load_model(str(model), compile=False), f"tf-keras {tf_keras.__version__}"
        except Exception:  # report Keras 3's reason: it is the first reader
            pass
    hint = "" if tf_keras is not None else "; a Keras 2 file may load with tf-keras (pip install tf-keras)"
    raise ExportError(f"{model}: Keras cannot load it ({first_line(first)}){hint}")
