using System.Diagnostics;
using System.Reflection;

namespace Distributed.Cli;

static class SelfProcess
{
    /// <summary>
    /// A start description for another dtrain process with <paramref name="arguments"/>: the same executable, or, under
    /// `dotnet dtrain.dll` (dotnet run, tests), the dotnet host with this program's assembly.
    /// </summary>
    public static ProcessStartInfo StartInfo(params string[] arguments)
    {
        var info = new ProcessStartInfo(Environment.ProcessPath!) { UseShellExecute = false };
        if (Path.GetFileNameWithoutExtension(Environment.ProcessPath!) == "dotnet")
            info.ArgumentList.Add(Assembly.GetEntryAssembly()!.Location);
        foreach (var a in arguments) info.ArgumentList.Add(a);
        return info;
    }
}
