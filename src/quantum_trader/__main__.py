from quantum_trader.cli import main

main()
