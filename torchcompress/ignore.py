"""The modules compression leaves alone unless told otherwise.

Output heads are the most sensitive layer and are usually tied to the embedding (which is not a
Linear and never matches ``nn.Linear``), so verbs skip both unless the caller passes its own ``ignore``.
"""

DEFAULT_IGNORE = ("lm_head", "re:.*embed.*")
