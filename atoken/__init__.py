"""atoken: the AToken unified visual tokenizer, trained at scale."""
