"""(commands registered here are added by their issue)"""
