"""storyseek.train"""
