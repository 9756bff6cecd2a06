"""Small Keras models in every format a user hands over, for tests/test_tensorflow_models.py. Runs inside the
TensorFlow environment (`make setup-tf`), which the test calls it with:

    .venv-tf/bin/python tests/tf_models.py FOLDER

Writes into FOLDER: stripes.npz (32x32 stripes, 4 classes, 0..1), the same trained CNN as cnn.keras, cnn.h5, a
SavedModel (saved/), a float cnn.tflite and a full-int8 cnn_int8.tflite; raw255.keras (scales 0..255 inside, as
most Keras image models do); a SavedModel with two signatures (two_signatures/); custom.keras (a layer class only
its own code knows); mixed.tflite (integer operators and a float one)."""

import sys
from pathlib import Path

import numpy as np
import tensorflow as tf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stripes import stripes  # noqa: E402

keras = tf.keras
folder = Path(sys.argv[1])
folder.mkdir(parents=True, exist_ok=True)
x_train, y_train = stripes(32, 4, 768, seed=0)
x_test, y_test = stripes(32, 4, 256, seed=1)
np.savez(folder / "stripes.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
keras.utils.set_random_seed(0)


def cnn(scale: float = 1.0, name: str = "cnn") -> keras.Model:
    inputs = keras.Input((32, 32, 3), name="image")
    x = keras.layers.Rescaling(scale, name="scale")(inputs) if scale != 1.0 else inputs
    x = keras.layers.Conv2D(16, 3, padding="same", name="stem_conv")(x)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    x = keras.layers.ReLU(name="stem_relu")(x)
    x = keras.layers.MaxPooling2D(name="pool")(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", name="b1_depthwise")(x)
    x = keras.layers.Conv2D(32, 1, activation="relu", name="b1_expand")(x)
    x = keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu", name="b2_conv")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = keras.layers.Dense(4, name="logits")(x)
    model = keras.Model(inputs, outputs, name=name)
    model.compile(optimizer=keras.optimizers.Adam(3e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    model.fit(x_train / scale, y_train, epochs=6, batch_size=64, verbose=0)
    return model


model = cnn()
model.save(folder / "cnn.keras")
model.save(folder / "cnn.h5")
model.export(folder / "saved", verbose=False)
float_file = tf.lite.TFLiteConverter.from_keras_model(model)
(folder / "cnn.tflite").write_bytes(float_file.convert())


def representative():
    for i in range(0, 256, 8):
        yield [x_train[i:i + 8]]


int8 = tf.lite.TFLiteConverter.from_keras_model(model)
int8.optimizations = [tf.lite.Optimize.DEFAULT]
int8.representative_dataset = representative
int8.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
int8.inference_input_type = int8.inference_output_type = tf.int8
(folder / "cnn_int8.tflite").write_bytes(int8.convert())

cnn(1 / 255, "raw255").save(folder / "raw255.keras")


class Twice(tf.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    @tf.function(input_signature=[tf.TensorSpec((None, 32, 32, 3), tf.float32)])
    def logits(self, image):
        return {"logits": self.inner(image)}

    @tf.function(input_signature=[tf.TensorSpec((None, 32, 32, 3), tf.float32)])
    def scores(self, image):
        return {"scores": tf.nn.softmax(self.inner(image))}


twice = Twice(model)
tf.saved_model.save(twice, str(folder / "two_signatures"), signatures={"logits": twice.logits, "scores": twice.scores})


@keras.utils.register_keras_serializable(package="user")
class Swish2(keras.layers.Layer):
    def call(self, x):
        return x * tf.sigmoid(2.0 * x)


inputs = keras.Input((32, 32, 3))
custom = keras.Model(inputs, keras.layers.Dense(4)(keras.layers.GlobalAveragePooling2D()(
    Swish2()(keras.layers.Conv2D(8, 3)(inputs)))))
custom.save(folder / "custom.keras")

# integer operators around one without an int8 kernel (FLOOR), which the converter leaves in float
inputs = keras.Input((32, 32, 3))
x = keras.layers.Conv2D(8, 3)(inputs)
x = keras.layers.Lambda(tf.math.floor)(x)
mixed_model = keras.Model(inputs, keras.layers.Dense(4)(keras.layers.GlobalAveragePooling2D()(x)))
mixed = tf.lite.TFLiteConverter.from_keras_model(mixed_model)
mixed.optimizations = [tf.lite.Optimize.DEFAULT]
mixed.representative_dataset = representative
(folder / "mixed.tflite").write_bytes(mixed.convert())
