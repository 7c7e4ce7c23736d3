"""The functional MAML engine against `higher`, finite differences and itself."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from msr import MAML, MSRConv2d, MSRLinear, ProtoNet, TaskBatch, TaskBatchNorm
from msr.testing import higher_meta_backward


def _regression_tasks(num_tasks=4, n_support=3, n_query=5, dim=6, out=4):
    x = torch.randn(num_tasks, n_support + n_query, dim, dtype=torch.float64)
    w = torch.randn(num_tasks, dim, out, dtype=torch.float64)
    y = x @ w
    return TaskBatch(x[:, :n_support], y[:, :n_support], x[:, n_support:], y[:, n_support:])


def _mlp():
    return nn.Sequential(MSRLinear(6, 5, 7), nn.Tanh(), MSRLinear(5, 4, 3)).double()


def _meta_grads(maml, tasks):
    maml.zero_grad()
    losses = maml.meta_backward(tasks)
    grads = {n: p.grad.clone() for n, p in maml.named_parameters() if p.grad is not None}
    return losses, grads


def _higher_meta_grads(maml, tasks):
    """The reference: a per-task loop through higher's differentiable SGD."""
    maml.zero_grad()
    losses = higher_meta_backward(maml, tasks)
    grads = {n: p.grad.clone() for n, p in maml.named_parameters() if p.grad is not None}
    return losses, grads


@pytest.mark.parametrize("batching", ["vmap", "loop", "grouped"])
@pytest.mark.parametrize("inner_steps", [1, 3])
def test_meta_gradients_match_higher(batching, inner_steps):
    maml = MAML(_mlp(), inner_steps=inner_steps, inner_lr=0.05, batching=batching)
    tasks = _regression_tasks()
    ours_loss, ours = _meta_grads(maml, tasks)
    ref_loss, ref = _higher_meta_grads(maml, tasks)
    torch.testing.assert_close(ours_loss, ref_loss, rtol=0, atol=1e-6)
    assert ours.keys() == ref.keys()
    assert {"model.0.U", "model.2.U", "raw_inner_lrs.0__v"} <= ours.keys()
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=0, atol=1e-6, msg=name)


def test_outer_gradient_wrt_U_matches_finite_differences():
    maml = MAML(nn.Sequential(MSRLinear(6, 4, 3)).double(), inner_steps=2, inner_lr=0.05)
    tasks = _regression_tasks()
    U = maml.model[0].U

    def meta_loss(u):
        with torch.no_grad():
            U.copy_(u)
        state, lrs = maml._state(detach=False)
        state["0.U"] = u
        return torch.stack(
            [
                maml._query((state, lrs), *tasks.task(i), {}, in_vmap=False)["loss"]
                for i in range(tasks.num_tasks)
            ]
        ).mean()

    u0 = U.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(meta_loss, (u0,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("batching", ["vmap", "loop"])
def test_first_order_drops_only_second_order_terms(batching):
    model = nn.Sequential(MSRLinear(6, 4, 3)).double()
    maml = MAML(model, first_order=True, inner_lr=0.05, batching=batching)
    tasks = _regression_tasks(num_tasks=1)
    _, grads = _meta_grads(maml, tasks)
    # By hand: adapt, then take the query gradient at the adapted point as the meta-gradient.
    layer = maml.model[0]
    xs, ys, xq, yq = tasks.task(0)
    v = layer.v.detach().clone().requires_grad_(True)
    U = layer.U.detach().clone().requires_grad_(True)
    support = F.mse_loss(F.linear(xs, (U @ v).view(4, 6), layer.bias), ys)
    g_v, g_b = torch.autograd.grad(support, (v, layer.bias))
    lr = maml.inner_lrs["0__v"].detach()
    slope = torch.sigmoid(maml.inner_lr_beta * maml.raw_inner_lrs["0__v"]).detach()  # dlr/draw
    v1 = (v - lr * g_v).detach().requires_grad_(True)
    b1 = (layer.bias - lr * g_b).detach().requires_grad_(True)
    query = F.mse_loss(F.linear(xq, (U @ v1).view(4, 6), b1), yq)
    dv, dU, db = torch.autograd.grad(query, (v1, U, b1))
    torch.testing.assert_close(grads["model.0.v"], dv)
    torch.testing.assert_close(grads["model.0.U"], dU)
    torch.testing.assert_close(grads["model.0.bias"], db)
    # The learned lr (a softplus of its raw parameter) gets its gradient through v1 = v - lr g.
    torch.testing.assert_close(grads["raw_inner_lrs.0__v"], -(dv @ g_v) * slope)
    torch.testing.assert_close(grads["raw_inner_lrs.0__bias"], -(db @ g_b) * slope)


def _conv_bn_net(norm=TaskBatchNorm):
    return nn.Sequential(
        MSRConv2d(1, 4, 3, padding=1),
        norm(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 3),
    ).double()


def _classification_tasks():
    x = torch.randn(3, 8, 1, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (3, 8))
    return TaskBatch(x[:, :3], y[:, :3], x[:, 3:], y[:, 3:])


@pytest.mark.parametrize("batching", ["vmap", "grouped"])
def test_batched_paths_loop_and_higher_agree_on_a_conv_net_with_batchnorm(batching):
    tasks = _classification_tasks()
    batched = MAML(_conv_bn_net(), F.cross_entropy, inner_steps=2, batching=batching)
    looped = MAML(_conv_bn_net(), F.cross_entropy, inner_steps=2, batching="loop")
    looped.load_state_dict(batched.state_dict())
    loss_b, grads_b = _meta_grads(batched, tasks)
    loss_l, grads_l = _meta_grads(looped, tasks)
    loss_h, grads_h = _higher_meta_grads(looped, tasks)
    torch.testing.assert_close(loss_b, loss_l, rtol=0, atol=1e-6)
    torch.testing.assert_close(loss_h, loss_l, rtol=0, atol=1e-6)
    assert grads_b.keys() == grads_l.keys() == grads_h.keys()
    assert "model.0.U_kernel" in grads_b
    for name in grads_b:
        torch.testing.assert_close(grads_b[name], grads_l[name], rtol=0, atol=1e-6, msg=name)
        torch.testing.assert_close(grads_h[name], grads_l[name], rtol=0, atol=1e-6, msg=name)
    accuracy = {"accuracy": lambda logits, target: (logits.argmax(-1) == target).double().mean()}
    eval_b = batched.evaluate(tasks, accuracy, chunk_size=2)
    eval_l = looped.evaluate(tasks, accuracy)
    for key in ("loss", "accuracy"):
        torch.testing.assert_close(eval_b[key], eval_l[key], rtol=0, atol=1e-6)


def test_torch_batchnorm_runs_on_the_loop_path_only():
    bn_net = _conv_bn_net(lambda c: nn.BatchNorm2d(c, track_running_stats=False))
    with pytest.raises(ValueError, match="wrong under vmap"):
        MAML(bn_net, F.cross_entropy)
    looped = MAML(bn_net, F.cross_entropy, batching="loop")
    tasks = _classification_tasks()
    _loss_l, grads_l = _meta_grads(looped, tasks)
    _loss_h, grads_h = _higher_meta_grads(looped, tasks)
    for name in grads_h:
        torch.testing.assert_close(grads_l[name], grads_h[name], rtol=0, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="wrong under vmap"):
        looped.batching = "vmap"
    with pytest.raises(ValueError, match="track_running_stats=False"):
        MAML(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)), batching="loop")


def test_evaluate_matches_training_losses_and_keeps_no_graph():
    maml = MAML(_mlp())
    tasks = _regression_tasks()
    losses, _ = _meta_grads(maml, tasks)
    maml.zero_grad()
    scores = maml.evaluate(tasks, chunk_size=3)
    torch.testing.assert_close(scores["loss"], losses)
    assert not scores["loss"].requires_grad
    assert all(p.grad is None for p in maml.parameters())


def test_adapt_returns_an_adapted_copy_and_leaves_the_model_alone():
    maml = MAML(_mlp(), inner_steps=2)
    xs, ys, xq, yq = _regression_tasks(num_tasks=1).task(0)
    before = {n: p.detach().clone() for n, p in maml.model.named_parameters()}
    adapted = maml.adapted_model(xs, ys)
    assert F.mse_loss(adapted(xs), ys) < F.mse_loss(maml.model(xs), ys)
    for name, param in maml.model.named_parameters():
        assert torch.equal(param, before[name])
    assert torch.equal(adapted[0].U, maml.model[0].U)  # the symmetry is not adapted
    expected = maml.evaluate(TaskBatch(xs[None], ys[None], xq[None], yq[None]))["loss"][0]
    torch.testing.assert_close(F.mse_loss(adapted(xq), yq), expected)


@pytest.mark.parametrize("batching", ["vmap", "loop"])
def test_test_time_inner_steps_equal_a_learner_trained_with_them(batching):
    """``evaluate`` / ``adapt`` with ``inner_steps=k`` score as a learner built with k steps
    (same initialization), and leave the training's step count in place, even after an error."""
    tasks = _regression_tasks()
    torch.manual_seed(0)
    one_step = MAML(_mlp(), inner_steps=1, batching=batching)
    torch.manual_seed(0)
    three_steps = MAML(_mlp(), inner_steps=3, batching=batching)
    expected = three_steps.evaluate(tasks)["loss"]
    torch.testing.assert_close(one_step.evaluate(tasks, inner_steps=3)["loss"], expected)
    assert not torch.allclose(one_step.evaluate(tasks)["loss"], expected)
    xs, ys = tasks.x_support[0], tasks.y_support[0]
    for name, param in three_steps.adapted_model(xs, ys).named_parameters():
        torch.testing.assert_close(
            one_step.adapted_model(xs, ys, inner_steps=3).get_parameter(name), param
        )
    with pytest.raises(ValueError, match=r"inner_steps must be a non-negative integer, got 2\.5"):
        one_step.evaluate(tasks, inner_steps=2.5)
    assert one_step.inner_steps == 1


def test_fixed_inner_lr_and_custom_fast_set():
    maml = MAML(_mlp(), learn_inner_lr=False, fast_parameters=["2.v", "2.bias"])
    assert maml.fast_names == ("2.v", "2.bias")
    assert all(not p.requires_grad for p in maml.raw_inner_lrs.parameters())
    _, grads = _meta_grads(maml, _regression_tasks())
    assert not any(n.startswith("raw_inner_lrs") for n in grads)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"inner_steps": -1}, "inner_steps must be a non-negative integer, got -1"),
        ({"inner_lr": 0.0}, "inner_lr must be a positive finite number, got 0.0"),
        ({"batching": "pmap"}, "batching must be 'vmap', 'loop' or 'grouped', got 'pmap'"),
        ({"fast_parameters": ["0.U"]}, r"fast_parameters \['0.U'\] are not adaptable"),
    ],
)
def test_bad_engine_configs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MAML(_mlp(), **kwargs)


def test_bad_task_batches():
    maml = MAML(_mlp())
    xs, ys, xq, yq = _regression_tasks()
    with pytest.raises(ValueError, match=r"same leading task dimension, got \[4, 4, 3, 4\]"):
        maml.meta_backward(TaskBatch(xs, ys, xq[:3], yq))
    with pytest.raises(ValueError, match="got 3"):
        maml.evaluate((xs, ys, xq))


@pytest.mark.parametrize("batching", ["vmap", "loop"])
@pytest.mark.parametrize("learner_kind", ["maml", "protonet"])
def test_meta_loss_backward_equals_meta_backward(batching, learner_kind):
    """A user who calls ``meta_loss(tasks).backward()`` (to add a regularizer, or through a
    GradScaler) gets the meta-gradient ``meta_backward`` accumulates."""
    if learner_kind == "maml":
        learner, tasks = MAML(_mlp(), batching=batching), _regression_tasks()
    else:
        encoder = nn.Sequential(nn.Linear(6, 5), nn.Tanh()).double()
        labels = torch.arange(3).repeat(2).expand(4, 6)
        x = torch.randn(4, 12, 6, dtype=torch.float64)
        tasks = TaskBatch(x[:, :6], labels, x[:, 6:], labels)
        learner = ProtoNet(encoder, ways=3, batching=batching)
    losses, expected = _meta_grads(learner, tasks)
    learner.zero_grad()
    loss = learner.meta_loss(tasks)
    assert loss.requires_grad and loss.item() == pytest.approx(losses.mean().item(), rel=1e-12)
    loss.backward()
    for name, parameter in learner.named_parameters():
        torch.testing.assert_close(parameter.grad, expected[name], rtol=1e-10, atol=1e-12)


def test_inner_curvature_is_the_spectrum_of_the_lr_scaled_support_hessian():
    """Both ends of D^1/2 H D^1/2's spectrum, against the Hessian built entry by entry."""
    torch.manual_seed(3)
    model = nn.Sequential(MSRLinear(3, 4, 5, bias=True), nn.Tanh(), nn.Linear(4, 2)).double()
    maml = MAML(model, inner_lr=0.3)
    with torch.no_grad():
        maml.raw_inner_lrs["2__weight"].copy_(_raw_lr(maml, 0.05))  # per tensor: D is not a * I
    xs, ys = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    names = list(maml.fast_names)
    shapes = [model.get_parameter(n).shape for n in names]
    sizes = [math.prod(shape) for shape in shapes]
    start = torch.cat([model.get_parameter(n).detach().flatten() for n in names])
    rest = {n: p.detach() for n, p in model.named_parameters() if n not in names}

    def support_loss(flat):
        fast = {
            n: piece.view(shape)
            for n, piece, shape in zip(names, flat.split(sizes), shapes, strict=True)
        }
        return F.mse_loss(torch.func.functional_call(model, {**rest, **fast}, (xs,)), ys)

    hessian = torch.autograd.functional.hessian(support_loss, start)
    lrs = torch.cat(
        [maml.inner_lrs[n.replace(".", "__")].detach().expand(size) for n, size in
         zip(names, sizes, strict=True)]
    )  # fmt: skip
    exact = torch.linalg.eigvalsh(lrs.sqrt()[:, None] * hessian * lrs.sqrt()[None, :])
    smallest, largest = maml.inner_curvature(xs, ys, iterations=400)
    assert smallest == pytest.approx(exact[0].item(), rel=1e-3, abs=1e-6)
    assert largest == pytest.approx(exact[-1].item(), rel=1e-3)
    plain = torch.linalg.eigvalsh(hessian)  # scaled=False: H's own spectrum
    smallest, largest = maml.inner_curvature(xs, ys, iterations=2000, scaled=False)
    assert smallest == pytest.approx(plain[0].item(), rel=1e-3, abs=1e-6)
    assert largest == pytest.approx(plain[-1].item(), rel=1e-3)


# --- the open inner loop: adapt(), a user's own outer objective, inner_loss_fn ----------------
def _huber(prediction, target):  # a support loss other than the query's (mse)
    return F.huber_loss(prediction, target, delta=0.5)


def _u_penalty(maml):
    return 1e-2 * sum(m.U.square().sum() for m in maml.model if isinstance(m, MSRLinear))


def _user_objective(maml, tasks, batched):
    """A researcher's outer objective over ``adapt``: an L1 query loss per task plus a penalty
    on U; per task in a Python loop, or as one ``torch.func.vmap`` over tasks."""

    def per_task(xs, ys, xq, yq):
        return F.l1_loss(maml(xq, params=maml.adapt(xs, ys, create_graph=True)), yq)

    if batched:
        losses = torch.func.vmap(per_task)(*tasks)
    else:
        losses = torch.stack([per_task(*task) for task in zip(*tasks, strict=True)])
    return losses.mean() + _u_penalty(maml)


def _higher_user_objective(maml, tasks):
    """The same objective through higher's differentiable SGD, the support loss ``_huber``."""
    import higher

    fast = [maml.model.get_parameter(n) for n in maml.fast_names]
    inner_opt = torch.optim.SGD([{"params": [p]} for p in fast], lr=0.1)  # lrs overridden
    lrs = [maml.inner_lrs[n.replace(".", "__")] for n in maml.fast_names]
    total = _u_penalty(maml)
    for xs, ys, xq, yq in zip(*tasks, strict=True):
        with higher.innerloop_ctx(
            maml.model, inner_opt, copy_initial_weights=False, override={"lr": lrs}
        ) as (fmodel, diffopt):
            for _ in range(maml.inner_steps):
                diffopt.step(_huber(fmodel(xs), ys))
            total = total + F.l1_loss(fmodel(xq), yq) / tasks.num_tasks
    return total


def _gradients(maml, objective):
    maml.zero_grad()
    objective().backward()
    return {n: p.grad.clone() for n, p in maml.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("batched", [False, True], ids=["per-task", "vmap"])
@pytest.mark.parametrize("inner_steps", [1, 2])
def test_a_user_outer_loop_over_adapt_matches_higher(batched, inner_steps):
    """``adapt(..., create_graph=True)`` under the user's own query loss and a regularizer on
    U, with a separate support loss, gets higher's meta-gradient (U, initial v, inner lrs)."""
    maml = MAML(_mlp(), inner_loss_fn=_huber, inner_steps=inner_steps, inner_lr=0.05)
    tasks = _regression_tasks()
    ours = _gradients(maml, lambda: _user_objective(maml, tasks, batched))
    reference = _gradients(maml, lambda: _higher_user_objective(maml, tasks))
    assert {"model.0.U", "raw_inner_lrs.0__v"} <= ours.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(ours[name], reference[name], rtol=0, atol=1e-6, msg=name)


def test_adapt_without_a_graph_is_the_adapted_model_detached():
    maml = MAML(_mlp(), inner_steps=2)
    xs, ys, xq, _ = _regression_tasks(num_tasks=1).task(0)
    adapted = maml.adapt(xs, ys)
    assert not any(t.requires_grad for t in adapted.values())
    assert adapted.keys() == dict(maml.model.state_dict()).keys()
    torch.testing.assert_close(maml(xq, params=adapted), maml.adapted_model(xs, ys)(xq))
    assert torch.equal(adapted["0.U"], maml.model[0].U)  # the symmetry is not adapted
    assert not torch.equal(adapted["0.v"], maml.model[0].v)


def test_the_inner_loop_descends_the_inner_loss_not_the_query_loss():
    """An inner loss with zero gradient leaves every fast parameter at its initial value."""
    maml = MAML(_mlp(), inner_loss_fn=lambda prediction, target: 0.0 * prediction.sum())
    xs, ys, xq, yq = _regression_tasks(num_tasks=1).task(0)
    for name, tensor in maml.adapt(xs, ys).items():
        assert torch.equal(tensor, maml.model.get_parameter(name)), name
    tasks = TaskBatch(xs[None], ys[None], xq[None], yq[None])  # and scores as unadapted
    torch.testing.assert_close(maml.evaluate(tasks)["loss"][0], F.mse_loss(maml(xq), yq))


# --- clear errors instead of silent misuse ------------------------------------------------
def test_a_task_batch_without_its_task_dimension_is_refused():
    maml = MAML(_mlp())
    xs, ys, xq, yq = _regression_tasks(num_tasks=1).task(0)  # one task: (examples, features)
    with pytest.raises(ValueError, match=r"need \(tasks, examples, \.\.\.\) dimensions.*x\[None\]"):
        maml.meta_backward(TaskBatch(xs, ys, xs, ys))  # not 3 one-example tasks
    with pytest.raises(
        ValueError, match=r"query inputs \(1, 5, 6\) and targets \(1, 4, 4\) differ"
    ):
        maml.evaluate(TaskBatch(xs[None], ys[None], xq[None], yq[None, :4]))
    with pytest.raises(ValueError, match=r"inputs \(6,\) vs \(5,\)"):
        maml.evaluate(TaskBatch(xs[None], ys[None], xq[None, :, :5], yq[None]))


def _dropout_mlp():
    return nn.Sequential(
        MSRLinear(6, 5, 7), nn.Tanh(), nn.Dropout(0.5), MSRLinear(5, 4, 3)
    ).double()


def test_dropout_under_vmap_draws_its_own_mask_per_task():
    maml = MAML(_dropout_mlp(), batching="vmap")
    one = _regression_tasks(num_tasks=1)
    same_task_four_times = TaskBatch(*(t.expand(4, *t.shape[1:]) for t in one))
    losses = maml.meta_backward(same_task_four_times)
    assert len(set(losses.tolist())) == 4  # four masks, not one, and no vmap randomness error
    assert all(torch.isfinite(p.grad).all() for p in maml.parameters() if p.grad is not None)
    maml.eval()  # no dropout: the vmap path is the loop's
    tasks = _regression_tasks()
    looped = MAML(maml.model, batching="loop")
    looped.raw_inner_lrs.load_state_dict(maml.raw_inner_lrs.state_dict())
    torch.testing.assert_close(maml.evaluate(tasks)["loss"], looped.evaluate(tasks)["loss"])


@pytest.mark.parametrize("batching", ["vmap", "loop", "grouped"])
def test_a_non_finite_meta_loss_names_its_tasks(batching):
    from msr import NonFiniteLossError

    maml = MAML(_mlp(), batching=batching)
    tasks = _regression_tasks()
    poisoned = tasks._replace(y_query=tasks.y_query.index_fill(0, torch.tensor([2]), math.inf))
    with pytest.raises(NonFiniteLossError, match=r"query loss is not finite: task 2 \(inf\) of 4"):
        maml.meta_backward(poisoned)
    if batching != "loop":  # refused before the backward pass
        assert all(p.grad is None for p in maml.parameters())
    with pytest.raises(NonFiniteLossError, match=r"task 2 .*nothing was backpropagated") as error:
        maml.meta_loss(poisoned)
    assert error.value.losses.shape == (4,) and torch.isfinite(error.value.losses[[0, 1, 3]]).all()


# --- inner learning rates: positive by construction, per step, or a rule of your own ---------
def _raw_lr(maml, lr):
    """The raw parameter of inner lr ``lr`` (the inverse of softplus(beta raw) / beta)."""
    beta = maml.inner_lr_beta
    return torch.log(torch.expm1(beta * torch.as_tensor(lr, dtype=beta.dtype))) / beta


def test_inner_lrs_stay_positive_whatever_the_outer_step():
    """An outer step that would drive a plain lr below zero leaves it positive (and the
    meta-loss finite), while small steps move it as they would move a plain lr."""
    maml = MAML(_mlp(), inner_lr=0.1)
    assert all(lr.item() == pytest.approx(0.1, rel=1e-12) for lr in maml.inner_lrs.values())
    optimizer = torch.optim.SGD(maml.raw_inner_lrs.parameters(), lr=1.0)
    for raw in maml.raw_inner_lrs.values():
        raw.grad = torch.full_like(raw, 0.01)  # a plain lr would go to 0.09
    optimizer.step()
    assert all(lr.item() == pytest.approx(0.09, rel=1e-3) for lr in maml.inner_lrs.values())
    for raw in maml.raw_inner_lrs.values():
        raw.grad = torch.full_like(raw, 0.5)  # a plain lr would go to -0.41
    optimizer.step()
    assert all(0 < lr < 1e-15 for lr in maml.inner_lrs.values())
    assert torch.isfinite(maml.meta_backward(_regression_tasks())).all()


@pytest.mark.parametrize("batching", ["vmap", "loop", "grouped"])
def test_per_step_inner_lrs_match_higher(batching):
    maml = MAML(_mlp(), inner_steps=3, per_step_inner_lr=True, batching=batching)
    with torch.no_grad():  # a different lr per step and tensor
        for index, raw in enumerate(maml.raw_inner_lrs.values()):
            raw.copy_(_raw_lr(maml, [0.02 + 0.01 * index, 0.05, 0.1]))
    assert all(lr.shape == (3,) for lr in maml.inner_lrs.values())
    tasks = _regression_tasks()
    ours_loss, ours = _meta_grads(maml, tasks)
    ref_loss, ref = _higher_meta_grads(maml, tasks)
    torch.testing.assert_close(ours_loss, ref_loss, rtol=0, atol=1e-6)
    assert "raw_inner_lrs.0__v" in ours and ours.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=0, atol=1e-6, msg=name)
    maml.evaluate(tasks, inner_steps=2)  # the first two steps' lrs
    with pytest.raises(ValueError, match="per-step inner lrs were learned for 3 steps"):
        maml.evaluate(tasks, inner_steps=4)


class _ScaledSignSGD(nn.Module):
    """An inner rule of a user's own: a meta-learned step size times the gradient's sign, plus
    plain SGD (so that it stays differentiable)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.01, dtype=torch.float64))

    def forward(self, params, grads, step):
        return {n: params[n] - self.scale * grads[n].sign() - 0.05 * grads[n] for n in params}


@pytest.mark.parametrize("batching", ["vmap", "loop", "grouped"])
def test_an_inner_update_of_ones_own_replaces_sgd(batching):
    tasks = _regression_tasks()
    torch.manual_seed(0)
    sgd = MAML(_mlp(), inner_steps=2, inner_lr=0.05, learn_inner_lr=False, batching=batching)
    torch.manual_seed(0)
    rule = MAML(
        _mlp(),
        inner_steps=2,
        inner_update=lambda params, grads, step: {n: params[n] - 0.05 * grads[n] for n in params},
        batching=batching,
    )
    assert not list(rule.raw_inner_lrs.parameters())
    torch.testing.assert_close(_meta_grads(rule, tasks), _meta_grads(sgd, tasks))
    learned = MAML(_mlp(), inner_steps=2, inner_update=_ScaledSignSGD(), batching=batching)
    assert "inner_update.scale" in dict(learned.named_parameters())  # meta-learned
    _, grads = _meta_grads(learned, tasks)
    assert grads["inner_update.scale"].abs() > 0
    with pytest.raises(ValueError, match="has no lrs to scale by"):
        learned.inner_curvature(*tasks.task(0)[:2])


def test_bad_inner_update_settings():
    with pytest.raises(TypeError, match="inner_update must be callable, got float"):
        MAML(_mlp(), inner_update=0.1)
    with pytest.raises(ValueError, match="an inner_update has its own rule"):
        MAML(_mlp(), inner_update=lambda p, g, s: p, per_step_inner_lr=True)
