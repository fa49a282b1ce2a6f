"""radflow router: decides, by readable rules, where each normalized instance goes."""
