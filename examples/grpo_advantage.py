"""GRPO's advantage in the signature LLM frameworks use (see docs/your_estimator.md).

    python -m suite measure --env tokens --gamma 1 --horizon 6 --shared-start \
        --trajectories 8000 --batch-size 8 --estimator-file examples/grpo_advantage.py \
        --estimators grpo_advantage

Each response's outcome reward is the sum of its token-level rewards; its advantage is the
reward minus the mean of its group, divided by the group's sample standard deviation + epsilon,
and it is given to every token of the response.
"""

import torch


def grpo_advantage(token_level_rewards, response_mask, group_index, epsilon=1e-6):
    """A_i = (R_i - mean of the group) / (std of the group + eps), at every token of response i."""
    scores = token_level_rewards.sum(-1)  # [bs]
    _, group = torch.unique(torch.as_tensor(group_index), return_inverse=True)
    size = torch.bincount(group).to(scores.dtype)
    mean = torch.zeros_like(size).index_add_(0, group, scores) / size
    centred = scores - mean[group]
    var = torch.zeros_like(size).index_add_(0, group, centred**2) / (size - 1)
    return (centred / (var.sqrt()[group] + epsilon))[:, None] * response_mask
