"""storyseek.model"""
