"""One smoke test of the real VGG16 path (random weights, 224x224, two images, top layers)."""

import keras
import numpy as np
import tensorflow as tf

from engine_models import flat, per_example_gradients
from influence import hvp, losses, params, scores


def test_vgg16_loss_selection_and_scores():
    keras.utils.set_random_seed(0)
    model = keras.applications.VGG16(weights=None)  # random weights: no download
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, size=(2, 224, 224, 3)).astype(np.float32)  # large inputs: peaked softmax
    y = np.array([3, 999])

    assert losses.output_kind(model) == "probabilities"
    variables = params.select(model, layers="fc2,predictions")
    assert [v.path for v in variables] == ["fc2/kernel", "fc2/bias", "predictions/kernel", "predictions/bias"]
    assert params.select(model, last=2) == variables

    # The loss comes from the logits under the softmax, even where a probability underflows.
    features = keras.Model(model.input, model.get_layer("fc2").output)(x).numpy().astype(np.float64)
    kernel, bias = (w.astype(np.float64) for w in model.get_layer("predictions").get_weights())
    logits = features @ kernel + bias
    shifted = logits - logits.max(axis=1, keepdims=True)
    expected = np.log(np.exp(shifted).sum(axis=1)) - shifted[np.arange(2), y]
    np.testing.assert_allclose(losses.per_example_loss(model)(x, y).numpy(), expected, rtol=1e-4)

    s_test = hvp.loss_gradient(model, variables, x[:1], y[:1])
    got = scores.influence_scores(model, variables, s_test, x, y)
    # Per-image gradients at batch 1 round differently from a batch of 2 at ReLU near-ties of a
    # random network, so the comparison is to float32 rounding of the features, not bit-exact.
    np.testing.assert_allclose(got, per_example_gradients(model, variables, x, y) @ flat(s_test), rtol=1e-3)
    assert got[0] > 0  # an image's own gradient: s_test . grad L(z) = ||grad||^2 > 0
    np.testing.assert_allclose(got[0], float(tf.add_n([tf.reduce_sum(g * g) for g in s_test])), rtol=1e-4)
