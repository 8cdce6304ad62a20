"""Draft service: hosts a drafter (a causal LM or n-gram lookup) that proposes tokens."""
