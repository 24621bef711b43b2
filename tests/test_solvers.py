"""Every solver through the same checks, via the two-phase interface the job uses:
prepared once on the training data, then applied to several test gradients."""

import json

import numpy as np
import pytest

from engine_models import explicit_hessian, flat, softmax_regression, tabular_data
from influence import hvp, params, solvers
from influence.sampling import MinibatchSampler

SOLVERS = {
    # name: (solver, batch size of the sampler, relative tolerance against the dense solve)
    "lissa": (solvers.LissaSolver(depth=150, damping=0.05), None, 1e-3),  # damping: Tikhonov, as for cg
    "cg": (solvers.ConjugateGradientSolver(damping=0.05), 8, 1e-5),
    "exact": (solvers.ExactSolver(damping=0.05), 8, 1e-6),
}


@pytest.fixture(scope="module")
def problem():
    model = softmax_regression(l2=0.01)
    x, y = tabular_data(40)
    variables = params.select(model)
    hessian = explicit_hessian(model, variables, x, y)  # tf.GradientTape Jacobian, not the engine
    gradients = [hvp.loss_gradient(model, variables, x[i:i + 1], y[i:i + 1]) for i in (0, 7)]
    return model, x, y, variables, hessian, gradients


@pytest.mark.parametrize("name", SOLVERS)
def test_solver_matches_the_dense_solve_for_every_test_gradient(problem, name):
    model, x, y, variables, hessian, gradients = problem
    solver, batch_size, tolerance = SOLVERS[name]
    # LiSSA samples minibatches; full batches here make its fixed point the dense solve's.
    sampler = MinibatchSampler.from_arrays(x, y, batch_size or len(x))
    curvature = solvers.TrainingCurvature.build(model, variables, sampler, echo=lambda *a, **k: None)
    prepared = solver.prepare(curvature)
    assert prepared.name == name
    json.dumps(prepared.diagnostics)  # goes into every record
    damping = prepared.diagnostics["effective_damping"]
    assert damping > 0
    answers = []
    for v in gradients:
        solution = prepared.solve(v, key=(0, 1))
        expected = np.linalg.solve(hessian + damping * np.eye(len(hessian)), flat(v))
        error = np.linalg.norm(flat(solution.s_test) - expected) / np.linalg.norm(expected)
        assert error < tolerance, f"{name}: relative error {error:.2e}"
        assert solution.diagnostics["effective_damping"] == pytest.approx(damping)
        json.dumps(solution.diagnostics)
        answers.append(flat(solution.s_test))
    assert np.linalg.norm(answers[0] - answers[1]) > 0.1 * np.linalg.norm(answers[0])  # two different answers
    again = flat(prepared.solve(gradients[0], key=(0, 1)).s_test)
    np.testing.assert_array_equal(again, answers[0])  # the same key gives the same answer
