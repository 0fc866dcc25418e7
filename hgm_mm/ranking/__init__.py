"""From a room to the products a shopper sees: the scene-category prior, the ranking weights, the
user profile, the catalogue folder and `Matcher`."""
