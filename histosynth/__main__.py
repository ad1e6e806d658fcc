from histosynth.cli import main

main()
