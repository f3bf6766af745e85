"""How grpokit runs a transformers model, below the rollout engines and the training forward:
the model's facts read once (`info`), the packed shared-prefix layout and its attention (`prefix`),
a vision-language model's image features, embeddings and positions (`vision`)."""
