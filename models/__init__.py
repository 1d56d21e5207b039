"""The model layer: CLIP loading and its speed settings, the tokenizer, the bundled offline models
(recipes, training, cache) and the generated scenes they learn from. It imports nothing of
Sieve's but `collection.schema` / `collection.storage`; every other folder builds on it."""
