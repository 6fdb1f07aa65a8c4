"""storyseek.data"""
