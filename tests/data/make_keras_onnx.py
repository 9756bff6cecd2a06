"""Writes keras_cnn.onnx: a small Keras CNN trained on the stripes of tests/onnx_nets.py, converted by tf2onnx with
the input as NCHW. Needs tensorflow and tf2onnx, which the project does not install; run it in their own venv:

    python -m venv /tmp/tfenv && /tmp/tfenv/bin/pip install tensorflow-cpu==2.21.0 tf2onnx==1.17.0
    /tmp/tfenv/bin/python tests/data/make_keras_onnx.py   # from the repository root

The file is committed so the suite reads a real tf2onnx graph without TensorFlow."""

import sys
from pathlib import Path

import tensorflow as tf
import tf2onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stripes import stripes  # noqa: E402  (the tests' data, in numpy only)

HERE = Path(__file__).parent
x_train, y_train = stripes(32, 4, 768, seed=0)
tf.keras.utils.set_random_seed(0)
inputs = tf.keras.Input((32, 32, 3), name="image")
x = tf.keras.layers.Rescaling(1 / 0.25, offset=-0.5 / 0.25)(inputs)  # normalisation inside the graph
x = tf.keras.layers.Conv2D(16, 3, padding="same", activation="relu")(x)
x = tf.keras.layers.MaxPooling2D()(x)
x = tf.keras.layers.DepthwiseConv2D(3, padding="same")(x)
x = tf.keras.layers.BatchNormalization()(x)
x = tf.keras.layers.ReLU(6.0)(x)
x = tf.keras.layers.Conv2D(32, 1, activation="relu")(x)
x = tf.keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu")(x)
x = tf.keras.layers.GlobalAveragePooling2D()(x)
outputs = tf.keras.layers.Dense(4, activation="softmax", name="scores")(x)
model = tf.keras.Model(inputs, outputs)
model.compile(optimizer=tf.keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
model.fit(x_train, y_train, epochs=8, batch_size=64, verbose=2)
signature = (tf.TensorSpec((None, 32, 32, 3), tf.float32, name="image"),)
tf2onnx.convert.from_keras(model, input_signature=signature, opset=17, inputs_as_nchw=["image"],
                           output_path=str(HERE / "keras_cnn.onnx"))
