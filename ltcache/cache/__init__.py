"""The feature cache: the contract between stage 1 and stage 2."""
