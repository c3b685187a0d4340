"""distributed.py with two gloo processes: a NaN on one rank stops both at the same step (no rank left waiting in a
collective), under DDP and FSDP2."""
import pytest
import torch
import torch.multiprocessing as mp


def _step_with_nan_on_rank1(rank: int, out: str, wrap: str) -> None:
    import torch.distributed as dist
    from vla_rft_engine import distributed as du
    from vla_rft_engine.config import Diverged
    from vla_rft_engine.models.policy import VLAPolicy
    from vla_rft_engine.models.policy_config import PolicyConfig
    from vla_rft_engine.train.sft import _FlowLoss, synthetic_demos
    from vla_rft_engine.utils import check_finite_step
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=2)
    d = du.Dist(rank, 2, 0, torch.device("cpu"))
    torch.manual_seed(0)
    policy = VLAPolicy(PolicyConfig(d_model=16, depth=1, heads=2, z_dim=16, enc_channels=8, sigma_d_model=16,
                                    sigma_depth=1, chunk_len=4))
    policy.sigma_net.requires_grad_(False)
    loss_fn, _ = du.data_parallel(_FlowLoss(policy), d, wrap, [policy.flow_head, policy.encoder])
    params = [p for n, p in policy.named_parameters() if p.requires_grad]
    demos = synthetic_demos(2, image_size=16)
    img, prop = torch.as_tensor(demos["frames"][:, 0]), torch.as_tensor(demos["proprio"][:, 0]).clone()
    act = torch.as_tensor(demos["actions"][:, :4])
    if rank == 1:
        prop[0, 0] = float("nan")  # what a single-process forward stops at (NonFiniteError in normalize_proprio)
    try:
        loss, mean = du.agreed_loss(d, "sft", 1, 1e-3, lambda: loss_fn(img, demos["instructions"], prop, act,
                                                                        torch.full((2,), 0.5), torch.zeros(2, 4, 7)))
        loss.backward()
        check_finite_step("sft", 1, mean, du.clip_grad_norm(params, 1.0), 1e-3)
        outcome = "trained"
    except Diverged as e:
        outcome = str(e).split(":")[0]
    dist.barrier()  # both ranks got here: nobody waits in a collective the other never reached
    with open(f"{out}/rank{rank}.txt", "w") as f:
        f.write(outcome)
    dist.destroy_process_group()


@pytest.mark.parametrize("wrap", ["ddp", "fsdp2"])
def test_nan_on_one_rank_stops_both_at_the_same_step(tmp_path, wrap):
    ctx = mp.start_processes(_step_with_nan_on_rank1, args=(str(tmp_path), wrap), nprocs=2, join=False,
                             start_method="spawn")
    for _ in range(300):  # a guard against a hang, not a timing: the two processes take a few seconds
        if ctx.join(timeout=1):
            break
    else:
        for p in ctx.processes:
            p.kill()
        pytest.fail("a rank is still waiting in a collective")
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == ["sft diverged at step 1"] * 2
