"""The modules compression leaves alone unless told otherwise.

Output heads are the most sensitive layer and are usually tied to the embedding (which is not a
Linear and never matches ``nn.Linear``), so verbs skip both unless the caller passes its own ``ignore``.
Mixture-of-experts routers stay float too: Mixtral's and Qwen-MoE's ``gate`` are not ``nn.Linear``;
Qwen-MoE's ``shared_expert_gate`` (hidden -> 1, a sigmoid gate on the shared expert) is.
"""

DEFAULT_IGNORE = ("lm_head", "re:.*embed.*", "re:.*shared_expert_gate")
