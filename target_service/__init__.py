"""Target service: hosts the target model and verifies draft tokens."""
