"""The remote code of trl-internal-testing/tiny-RemoteForCausalLM, vendored from TRL
(scripts/generate_tiny_models/for_causal_lm/_remote_code/, Apache-2.0); copied into the stand-in repo."""
